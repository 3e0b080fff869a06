"""The operator's watches on children carry a label selector, so the apiserver filters them: the
operator is never streamed the cluster's other ConfigMaps, Deployments, Jobs…"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from kopf._cogs.clients import api
from kopf.testing import KopfRunner

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]

SELECTOR = "app.kubernetes.io/managed-by=k2-operator"
CHILD_PLURALS = {"configmaps", "services", "deployments", "poddisruptionbudgets", "ingresses", "cronjobs", "jobs"}


def test_child_watches_are_filtered_by_the_apiserver(namespace: str, operator_env: dict, k2op: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    urls: list[str] = []
    stream = api.stream

    def recording(*, url: str, **kwargs: Any) -> Any:
        urls.append(url)
        return stream(url=url, **kwargs)

    monkeypatch.setattr(api, "stream", recording)  # every watch kopf opens against the apiserver

    def watched() -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for url in list(urls):
            parsed = urlparse(url)
            plural = parsed.path.rstrip("/").split("/")[-1]
            seen.setdefault(plural, []).extend(parse_qs(parsed.query).get("labelSelector", [""]))
        return seen

    def all_watched() -> dict[str, list[str]] | None:
        seen = watched()
        return seen if set(seen) >= CHILD_PLURALS else None

    with KopfRunner(k2op.operator_args(namespace), timeout=60) as runner:
        seen = k2op.wait_for(all_watched, "watches on every child kind", 60)
    assert runner.exception is None

    for plural in CHILD_PLURALS:
        assert seen[plural] and all(s == SELECTOR for s in seen[plural]), (plural, seen[plural])
    assert all(s == "" for s in seen["icebergtables"]), "the custom resources themselves are watched whole"
