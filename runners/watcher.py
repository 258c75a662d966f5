"""VersionWatcher: follows aliases and stages, and moves endpoints by blue-green cutover.

1. Green (the new version) starts beside blue on its own port; ready = /ping is 200 and,
   when the model saved an input example, one warm-up prediction answered 200.
2. ``endpoint.runner`` is swapped: requests already bound to blue stay there, new ones
   go to green.
3. Blue is drained (its in-flight count reaches 0, or ``drain_timeout``) and stopped.
If green fails, blue keeps serving and the attempt is retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp

from .endpoint import READY, Endpoint, backoff
from .errors import ResolveError, RunnerError, RunnerStartError
from .pool import RunnerPool
from .registry import Resolved
from .runner import Runner
from .spec import EndpointSpec

log = logging.getLogger("model_gateway.watcher")

JITTER = 0.1  # ±10% of poll_interval, so many endpoints do not poll in lockstep


class VersionWatcher:
    """Polls only endpoints with a live runner: a cold endpoint resolves when it starts."""

    def __init__(self, pool: RunnerPool, *, tick: float = 0.5) -> None:
        self.pool = pool
        self.tick = tick
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="version-watcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- when to look ---------------------------------------------------------------------
    def trigger(self, model_name: str) -> list[Endpoint]:
        """Re-resolve now every live endpoint following ``model_name`` (a webhook arrived)."""
        hits = [ep for ep in self.pool.endpoints.values()
                if ep.target.follows and ep.target.name == model_name]
        for ep in hits:
            self.refresh_now(ep)
        return hits

    def refresh_now(self, ep: Endpoint) -> None:
        """Re-resolve one endpoint now, outside its polling schedule."""
        self._schedule_next(ep)
        self.pool.spawn(self.refresh(ep, force=True), f"refresh-{ep.spec.label}")

    def _schedule_next(self, ep: Endpoint) -> None:
        jitter = 1 + random.uniform(-JITTER, JITTER)
        ep.next_poll = time.monotonic() + ep.spec.poll_interval * jitter

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            for ep in list(self.pool.endpoints.values()):
                if not ep.target.follows or ep.runner is None or ep.state != READY:
                    ep.next_poll = 0.0
                elif ep.next_poll == 0.0:  # just became ready: it resolved as it started
                    self._schedule_next(ep)
                elif now >= ep.next_poll:
                    self._schedule_next(ep)
                    self.pool.spawn(self.refresh(ep), f"poll-{ep.spec.label}")

    # -- what to do -----------------------------------------------------------------------
    async def refresh(self, ep: Endpoint, *, force: bool = False) -> None:
        """Re-resolve ``ep``'s target; cut over if it names another version.

        One refresh per endpoint at a time: a second caller waits for the running one.
        ``force`` skips the backoff after a failed cutover (an operator or webhook asked).
        """
        if ep.refresh_task is not None and not ep.refresh_task.done():
            await asyncio.shield(ep.refresh_task)
            return
        ep.refresh_task = asyncio.create_task(self._refresh(ep, force), name=f"refresh-{ep.key}")
        await asyncio.shield(ep.refresh_task)

    async def _refresh(self, ep: Endpoint, force: bool) -> None:
        if not ep.target.follows or ep.runner is None or ep.state != READY:
            return
        ep.last_poll = time.time()
        try:
            resolved = await self.pool.registry.resolve(ep.spec.model_uri, example=True)
        except ResolveError as exc:
            ep.poll_failures += 1
            ep.last_poll_error = str(exc)
            self.pool.events.poll_failure(ep)
            log.warning("endpoint %s: registry poll failed; version %s keeps serving: %s",
                        ep.spec.label, ep.version, exc)
            return
        ep.last_poll_error = None
        if resolved.version == ep.version:
            return
        if (not force and resolved.version == ep.failed_version
                and time.monotonic() < ep.cutover_retry_at):
            return
        await self._cutover(ep, resolved)

    async def replace(self, ep: Endpoint, spec: EndpointSpec) -> None:
        """Adopt a changed spec; a live endpoint moves to a runner started from it, blue-green.

        If the new runner fails, the old spec and runner stay in service.
        """
        old = ep.spec
        ep.use_spec(spec)
        if ep.runner is None or ep.state != READY:
            return
        try:
            resolved = await self.pool.registry.resolve(spec.model_uri, example=True)
        except ResolveError as exc:
            ep.use_spec(old)
            ep.last_error = f"config change not applied: cannot resolve {spec.model_uri}: {exc}"
            raise RunnerStartError(ep.last_error) from exc
        await self._cutover(ep, resolved)
        if ep.failed_version is not None or ep.runner is None or ep.runner.spec is not spec:
            ep.use_spec(old)
            raise RunnerStartError(ep.last_error or "config change not applied")

    async def _cutover(self, ep: Endpoint, resolved: Resolved) -> None:
        blue = ep.runner
        ep.pending_version = resolved.version
        log.info("endpoint %s: cutover %s -> %s starting", ep.spec.label, ep.version,
                 resolved.version)
        began = time.monotonic()
        try:
            green = await self.pool.launch(ep, resolved, pending=True)
            if resolved.example:
                await self._warm_up(green, resolved.example)
        except RunnerError as exc:
            ep.cutover_failures += 1
            wait = backoff(ep.cutover_failures)
            ep.failed_version, ep.cutover_retry_at = resolved.version, time.monotonic() + wait
            ep.last_error = f"cutover to version {resolved.version} failed: {exc}"
            self.pool.events.cutover(ep, False)
            log.error("endpoint %s: %s (version %s keeps serving; retry in %.0fs)",
                      ep.spec.label, ep.last_error, ep.version, wait)
            return
        finally:
            ep.pending, ep.pending_version, ep.pending_state = None, None, None
        if ep.runner is not blue:  # blue died or was evicted meanwhile: green serves anyway
            blue = ep.runner
        ep.runner, ep.version, ep.state = green, resolved.version, READY
        ep.last_error, ep.failed_version, ep.cutover_failures = None, None, 0
        self.pool.events.cutover(ep, True)
        log.info("endpoint %s: now serving version %s (green ready in %.1fs)", ep.spec.label,
                 resolved.version, time.monotonic() - began)
        if blue is not None:
            self.pool.spawn(self.pool.drain(blue, ep.spec.drain_timeout), f"drain-{blue.port}")

    async def _warm_up(self, runner: Runner, example: str) -> None:
        """One prediction with the model's own input example before traffic moves."""
        assert runner.session is not None
        try:
            async with runner.session.post(
                f"{runner.base_url}/invocations", data=example.encode(),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=runner.spec.request_timeout),
            ) as resp:
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            await runner.stop(grace=2)
            raise RunnerStartError(f"warm-up prediction failed: {exc!r}") from exc
        if resp.status != 200:
            await runner.stop(grace=2)
            raise RunnerStartError(f"warm-up prediction answered {resp.status}: "
                                   f"{body[:300].decode(errors='replace')}")
