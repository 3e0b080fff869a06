"""Applying rendered children: adopt, server-side apply, prune what is no longer rendered, and
remember the version applied (so the child watch can tell someone else's change from ours)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import kopf
from kubernetes.client.rest import ApiException

from k2_operator import conditions
from k2_operator.conditions import Condition
from k2_operator.handlers import backoff, metrics, runtime
from k2_operator.handlers.status import write_status
from k2_operator.kube import CHILD_KINDS, SECRET, Applied
from k2_operator.models import KindInfo
from k2_operator.render.common import MANAGED_BY, RenderContext, referenced_secrets


class ApplyFailed(metrics.CountedRetry):
    """The apiserver refused a child; reported as Ready=False ApplyFailed and retried."""


def fingerprint(child: Mapping[str, Any]) -> str:
    """What changes when someone changes the object, but not when only its status moves:
    `generation` where the kind has one (Deployment, PDB, CronJob, Ingress), else `resourceVersion`."""
    meta = child["metadata"]
    return f"g{meta['generation']}" if meta.get("generation") else f"r{meta.get('resourceVersion')}"


def _key(child: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = child["metadata"]
    return child["kind"], meta["namespace"], meta["name"]


def remember(child: Mapping[str, Any]) -> None:
    """The version of a child as the operator last applied it (to tell drift from our own writes)."""
    runtime.get().applied[_key(child)] = fingerprint(child)


def applied_version(child: Mapping[str, Any]) -> str | None:
    return runtime.get().applied.get(_key(child))


def render_children(namespace: str, render: Callable[[RenderContext], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """`render` with the current resourceVersion of every Secret its pods read through env, so a
    rotated Secret changes the pod template (and rolls the pods) at the next reconcile."""
    rt = runtime.get()
    ctx = rt.render_context()
    names = referenced_secrets(render(ctx))
    if not names:
        return render(ctx)
    versions = {}
    for name in names:
        secret = rt.kube.get(SECRET, namespace, name)
        versions[name] = secret["metadata"].get("resourceVersion", "") if secret else "absent"
    return render(dataclasses.replace(ctx, secret_versions=versions))


def owner_selector(info: KindInfo, name: str) -> str:
    return f"app.kubernetes.io/managed-by={MANAGED_BY},k2.io/{info.kind.lower()}={name}"


def apply_children(info: KindInfo, body: Mapping[str, Any], objects: list[dict[str, Any]],
                   prune_kinds: Sequence[str], *, keep: Sequence[str] = ()) -> tuple[list[Applied], list[str]]:
    """Adopt and server-side-apply `objects`; delete this owner's children of `prune_kinds` that are
    no longer rendered (unless named in `keep`). Returns what was applied and what was deleted.

    A refusal by the apiserver (a quota, an admission webhook, a missing CRD) is written to the
    status as Ready=False/ApplyFailed and retried with backoff."""
    try:
        return _apply_children(info, body, objects, prune_kinds, keep)
    except ApiException as exc:
        detail = exc.reason or ""
        with contextlib.suppress(ValueError, TypeError):
            detail = json.loads(exc.body or "").get("message", detail)
        message = f"applying children failed ({exc.status}): {detail}"
        write_status(info, body, [], required=(), observed_state={},
                     ready_override=Condition.false(conditions.READY, "ApplyFailed", message))
        raise ApplyFailed(message, delay=backoff.retry_delay(0)) from exc


def _apply_children(info: KindInfo, body: Mapping[str, Any], objects: list[dict[str, Any]],
                    prune_kinds: Sequence[str], keep: Sequence[str]) -> tuple[list[Applied], list[str]]:
    rt = runtime.get()
    kopf.adopt(objects, owner=cast(kopf.Body, body))  # ownerReferences (garbage collection), namespace, owner labels
    applied = [rt.kube.apply(obj) for obj in objects]
    for result in applied:
        remember(result.body)
    wanted = {(o["kind"], o["metadata"]["name"]) for o in objects} | {(k, n) for k, n in (x.split("/") for x in keep)}
    pruned = []
    uid = body["metadata"]["uid"]
    for kind_name in prune_kinds:
        kind = CHILD_KINDS[kind_name]
        if kind_name == "ServiceMonitor" and not rt.service_monitor_available():
            continue
        for child in rt.kube.list(kind, body["metadata"]["namespace"], owner_selector(info, body["metadata"]["name"])):
            owned = any(ref.get("uid") == uid for ref in child["metadata"].get("ownerReferences") or [])
            if owned and (kind_name, child["metadata"]["name"]) not in wanted:
                rt.kube.delete(kind, child["metadata"]["namespace"], child["metadata"]["name"])
                pruned.append(f"{kind_name}/{child['metadata']['name']}")
    return applied, pruned


def describe_changes(applied: Sequence[Applied], pruned: Sequence[str]) -> list[str]:
    return ([f"created {a.ref}" for a in applied if a.created] + [f"updated {a.ref}" for a in applied
                                                                  if a.changed and not a.created]
            + [f"deleted {p}" for p in pruned])
