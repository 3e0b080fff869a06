"""One active operator: leader election on a coordination.k8s.io Lease, as controller-runtime does.

`k2 operator` waits here until this process holds the Lease and only then starts kopf, so a second
replica reconciles nothing while the first is alive; meanwhile it answers its liveness probe as a
healthy standby.
The leader renews the Lease every third of its duration; a replica takes over once the Lease has
not been renewed for a whole duration *as this replica observed it* (no clock comparison across
machines). A leader that finds the Lease taken from it stops at once (`on_lost`), so two never act
together for longer than one renewal period. Stopping cleanly releases the Lease for a fast handover.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import structlog
from aiohttp import web
from kubernetes.client.rest import ApiException

from k2_operator.kube import LEASE, Kube

log = structlog.get_logger("k2_operator.leadership")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{os.getpid()}_{id(object()):x}"


@dataclass
class Elector:
    kube: Kube
    namespace: str
    name: str
    duration: float
    me: str = field(default_factory=identity)
    _seen: tuple[Any, ...] | None = None  # (holder, renewTime) last observed
    _seen_at: float = 0.0

    def _spec(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        transitions = int((previous or {}).get("leaseTransitions") or 0)
        if previous and previous.get("holderIdentity") != self.me:
            transitions += 1
        acquired = (previous or {}).get("acquireTime") if (previous or {}).get("holderIdentity") == self.me else _now()
        return {"holderIdentity": self.me, "leaseDurationSeconds": max(1, round(self.duration)),
                "acquireTime": acquired, "renewTime": _now(), "leaseTransitions": transitions}

    def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease; True while this process holds it."""
        lease = self.kube.get(LEASE, self.namespace, self.name)
        try:
            if lease is None:
                self.kube.create(LEASE, self.namespace, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                                         "metadata": {"name": self.name}, "spec": self._spec(None)})
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            if holder not in (None, "", self.me) and not self._expired(holder, spec.get("renewTime")):
                return False
            lease["spec"] = self._spec(spec)
            self.kube.replace(LEASE, self.namespace, lease)
            return True
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote it in between: they won this round
                return False
            raise

    def _expired(self, holder: str, renew_time: str | None) -> bool:
        seen = (holder, renew_time)
        if seen != self._seen:
            self._seen, self._seen_at = seen, time.monotonic()
            return False
        return time.monotonic() - self._seen_at > self.duration

    def release(self) -> None:
        lease = self.kube.get(LEASE, self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.me:
            return
        lease["spec"] = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _now()}
        try:
            self.kube.replace(LEASE, self.namespace, lease)
        except ApiException as exc:
            log.warning("leadership.release_failed", error=str(exc))

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        announced = False
        while not await loop.run_in_executor(None, self.try_acquire):
            if not announced:
                log.info("leadership.waiting", lease=f"{self.namespace}/{self.name}", identity=self.me)
                announced = True
            await asyncio.sleep(self.duration / 4)
        log.info("leadership.acquired", lease=f"{self.namespace}/{self.name}", identity=self.me)

    async def standby(self, liveness: str | None) -> None:
        """`acquire`, answering the liveness endpoint (kopf's own starts only with kopf)."""
        if not liveness:
            await self.acquire()
            return
        url = urlparse(liveness)
        app = web.Application()

        async def healthy(_request: web.Request) -> web.Response:
            return web.json_response({"standby": self.me})

        app.router.add_get(url.path or "/", healthy)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, url.hostname, url.port).start()
        try:
            await self.acquire()
        finally:
            await runner.cleanup()

    async def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew until cancelled; a Lease taken by another replica calls `on_lost` and returns."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.duration / 3)
            try:
                held = await loop.run_in_executor(None, self.try_acquire)
            except ApiException as exc:  # the apiserver unreachable: keep trying until the Lease runs out
                log.warning("leadership.renew_failed", error=str(exc))
                continue
            if not held:
                log.error("leadership.lost", lease=f"{self.namespace}/{self.name}", identity=self.me)
                on_lost()
                return
