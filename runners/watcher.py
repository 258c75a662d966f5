"""VersionWatcher: polls the registry for endpoints that follow an alias or a stage."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from .endpoint import READY, Endpoint
from .pool import RunnerPool

log = logging.getLogger("model_gateway.watcher")

JITTER = 0.1  # ±10% of poll_interval, so many endpoints do not poll in lockstep


class VersionWatcher:
    """Polls only endpoints with a live runner: a cold endpoint resolves when it starts."""

    def __init__(self, pool: RunnerPool, *, tick: float = 0.5) -> None:
        self.pool = pool
        self.tick = tick
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="version-watcher")

    async def close(self) -> None:
        for task in [self._task, *self._inflight]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._task, *self._inflight] if t),
                             return_exceptions=True)

    def trigger(self, model_name: str) -> list[Endpoint]:
        """Re-resolve now every live endpoint following ``model_name`` (a webhook arrived)."""
        hits = [ep for ep in self.pool.endpoints.values()
                if ep.target.follows and ep.target.name == model_name]
        for ep in hits:
            self._refresh(ep, force=True)
        return hits

    def _refresh(self, ep: Endpoint, *, force: bool = False) -> None:
        jitter = 1 + random.uniform(-JITTER, JITTER)
        ep.next_poll = time.monotonic() + ep.spec.poll_interval * jitter
        task = asyncio.create_task(self.pool.refresh(ep, force=force), name=f"poll-{ep.key}")
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("registry refresh failed", exc_info=task.exception())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            for ep in list(self.pool.endpoints.values()):
                if not ep.target.follows or ep.runner is None or ep.state != READY:
                    ep.next_poll = 0.0
                    continue
                if ep.next_poll == 0.0:  # just became ready: it resolved at start
                    ep.next_poll = now + ep.spec.poll_interval
                elif now >= ep.next_poll:
                    self._refresh(ep)
