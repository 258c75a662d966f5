"""RunnerPool: owns every runner process; starts them lazily, evicts, replaces, reaps."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterable

import aiohttp

from .endpoint import COLD, FAILED, READY, STARTING, STOPPING, Endpoint, backoff
from .errors import PoolBusy, ResolveError, RunnerError, RunnerStartError, StartBackoff
from .launch import find_leftovers, kill_group, runner_env
from .ports import PortAllocator
from .registry import RegistryClient, Resolved
from .runner import Runner
from .spec import EndpointSpec, PoolSpec

log = logging.getLogger("model_gateway.pool")


class RunnerPool:
    """The only owner of runner processes.

    Requests call :meth:`acquire` / :meth:`release`; a request is bound to the runner
    :meth:`acquire` returns, so swapping ``endpoint.runner`` (a cutover) moves only new
    requests. ``max_runners`` counts live and starting runners; a cutover's green runner
    may exceed it by one while it starts.
    """

    def __init__(self, spec: PoolSpec, endpoints: Iterable[EndpointSpec], owner: str) -> None:
        self.spec = spec
        self.owner = owner
        self.endpoints: dict[tuple[str, str], Endpoint] = {e.key: Endpoint(e) for e in endpoints}
        self.env = runner_env(spec, owner)
        self.registry = RegistryClient(self.env)
        self.ports = PortAllocator()
        self.runners: set[Runner] = set()  # every runner whose process may be alive
        self._reserved = 0  # slots promised to cold starts that have not launched yet
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[object]] = set()
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        for pgid in find_leftovers(self.owner):
            log.warning("stopping leftover runner process group %s of an earlier gateway", pgid)
            kill_group(pgid, signal.SIGKILL)
        self._spawn(self.registry.start(), "registry-start")
        self._spawn(self._reap_idle(), "idle-reaper")
        for ep in self.endpoints.values():
            if ep.spec.preload:
                self._spawn(self._preload(ep), f"preload-{ep.spec.label}")

    async def _preload(self, ep: Endpoint) -> None:
        try:
            await self._ensure_runner(ep)
        except RunnerError as exc:
            log.error("preloading %s failed: %s", ep.spec.label, exc)

    def not_ready(self) -> list[str]:
        """Why the pool is not ready yet: preloaded endpoints without a ready runner."""
        return [f"{ep.spec.label}: {ep.state}" + (f" ({ep.last_error})" if ep.last_error else "")
                for ep in self.endpoints.values() if ep.spec.preload and ep.state != READY]

    async def close(self) -> None:
        """Stop every runner (SIGTERM, then SIGKILL of its group) and the resolver."""
        self._closing = True
        runners = list(self.runners)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(r.stop(grace=10) for r in runners), return_exceptions=True)
        for ep in self.endpoints.values():
            ep.runner, ep.pending, ep.state = None, None, COLD
        await self.registry.close()

    def _spawn(self, coro: object, name: str) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- requests -------------------------------------------------------------------------
    async def acquire(self, ep: Endpoint) -> Runner:
        """The runner to send one request to, started if needed; release() it afterwards."""
        if ep.slots is not None:
            try:
                await asyncio.wait_for(ep.slots.acquire(), self.spec.queue_timeout)
            except TimeoutError as exc:
                raise PoolBusy(f"{ep.spec.max_concurrency} requests already in flight for "
                               f"{ep.spec.label}", retry_after=1) from exc
        try:
            runner = ep.runner
            if runner is None or not runner.is_alive or runner.stopping:
                runner = await self._ensure_runner(ep)
            runner.bind()
            return runner
        except BaseException:
            if ep.slots is not None:
                ep.slots.release()
            raise

    def release(self, ep: Endpoint, runner: Runner) -> None:
        runner.unbind()
        if ep.slots is not None:
            ep.slots.release()
        if runner.in_flight == 0:
            self._notify_slot()

    async def _ensure_runner(self, ep: Endpoint) -> Runner:
        if ep.start_task is None:
            wait = ep.retry_at - time.monotonic()
            if ep.state == FAILED and wait > 0:
                raise StartBackoff(ep.last_error or "start failed", retry_after=wait)
            ep.start_task = asyncio.create_task(self._cold_start(ep), name=f"start-{ep.spec.label}")
        try:
            return await asyncio.wait_for(asyncio.shield(ep.start_task), ep.spec.startup_timeout)
        except TimeoutError as exc:
            raise RunnerStartError(f"{ep.spec.label} not ready within startup_timeout "
                                   f"({ep.spec.startup_timeout:.0f}s)", retry_after=5) from exc

    async def _cold_start(self, ep: Endpoint) -> Runner:
        ep.state = STARTING
        try:
            try:
                resolved = await self.registry.resolve(ep.spec.model_uri)
            except ResolveError as exc:
                raise RunnerStartError(f"cannot resolve {ep.spec.model_uri}: {exc}") from exc
            await self._reserve_slot(ep)
            try:
                runner = await self._launch(ep, resolved)
            finally:
                self._reserved -= 1
            ep.runner, ep.version, ep.state = runner, resolved.version, READY
            ep.last_error, ep.failed_version, ep.start_failures = None, None, 0
            return runner
        except RunnerError as exc:
            ep.state, ep.last_error = FAILED, str(exc)
            ep.start_failures += 1
            wait = backoff(ep.start_failures)
            ep.retry_at = time.monotonic() + wait
            if isinstance(exc, RunnerStartError):
                exc.retry_after = wait
            log.error("endpoint %s failed to start (retry in %.0fs): %s", ep.spec.label, wait, exc)
            raise
        except asyncio.CancelledError:
            ep.state = COLD
            raise
        finally:
            ep.start_task = None

    async def _launch(self, ep: Endpoint, resolved: Resolved, *, pending: bool = False) -> Runner:
        """Start a runner for ``resolved`` and wait until it answers /ping."""
        port = self.ports.acquire()
        runner = Runner(ep.spec, resolved.uri, resolved.version, port, self.env)
        self.runners.add(runner)
        if pending:
            ep.pending = runner
        self._spawn(self._supervise(ep, runner), f"supervise-{port}")
        try:
            await runner.start()
            await runner.wait_ready(ep.spec.startup_timeout)
        except BaseException:
            await runner.stop(grace=2)
            raise
        log.info("endpoint %s version %s ready on port %s in %.1fs", ep.spec.label,
                 resolved.version or "-", port, time.time() - (runner.started_at or time.time()))
        return runner

    async def _supervise(self, ep: Endpoint, runner: Runner) -> None:
        """Reap a runner's exit: forget it, and mark its endpoint failed if it crashed."""
        try:
            await runner.exited.wait()
        finally:
            self.runners.discard(runner)
            self.ports.release(runner.port)
            self._notify_slot()
        if ep.runner is runner:
            ep.runner = None
            if runner.stopping:
                ep.state = COLD
            else:
                ep.state, ep.retry_at = FAILED, time.monotonic()
                ep.last_error = runner._failure(f"runner exited with code {runner.returncode}")
                log.error("endpoint %s: runner pid %s exited with code %s", ep.spec.label,
                          runner.pid, runner.returncode)
        await runner.stop(grace=1)  # close its connection pool, kill any stragglers

    # -- capacity -------------------------------------------------------------------------
    def _notify_slot(self) -> None:
        self._slot_freed.set()
        self._slot_freed = asyncio.Event()

    def _live(self) -> int:
        return len(self.runners) + self._reserved

    def _lru_idle(self) -> Runner | None:
        idle = [r for ep in self.endpoints.values() if (r := ep.runner) is not None
                and not ep.spec.pinned and r.in_flight == 0 and not r.stopping
                and ep.pending is None]
        return min(idle, key=lambda r: r.last_used, default=None)

    async def _reserve_slot(self, ep: Endpoint) -> None:
        deadline = time.monotonic() + self.spec.queue_timeout
        while self._live() >= self.spec.max_runners:
            victim = self._lru_idle()
            if victim is not None:
                await self.evict(victim, reason=f"making room for {ep.spec.label}")
                continue
            freed = self._slot_freed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolBusy(f"all {self.spec.max_runners} runners are busy", retry_after=2)
            try:
                await asyncio.wait_for(freed.wait(), remaining)
            except TimeoutError:
                pass
        self._reserved += 1

    async def evict(self, runner: Runner, *, reason: str) -> None:
        """Detach an idle runner from its endpoint (which goes cold) and stop it."""
        for ep in self.endpoints.values():
            if ep.runner is runner:
                ep.runner, ep.state = None, COLD
                log.info("evicting %s version %s: %s", ep.spec.label, runner.version or "-",
                         reason)
        await runner.stop(grace=5)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(1)
            if self.spec.idle_timeout <= 0:
                continue
            now = time.monotonic()
            for ep in list(self.endpoints.values()):
                r = ep.runner
                if (r is not None and not ep.spec.pinned and r.in_flight == 0
                        and ep.pending is None and now - r.last_used >= self.spec.idle_timeout):
                    self._spawn(self.evict(r, reason="idle"), f"evict-{r.port}")

    # -- following the registry -----------------------------------------------------------
    async def refresh(self, ep: Endpoint, *, force: bool = False) -> None:
        """Re-resolve ``ep``'s target and cut over to a new version by blue-green."""
        if ep.refresh_task is not None and not ep.refresh_task.done():
            return await asyncio.shield(ep.refresh_task)
        ep.refresh_task = asyncio.create_task(self._refresh(ep, force), name=f"refresh-{ep.key}")
        await asyncio.shield(ep.refresh_task)

    async def _refresh(self, ep: Endpoint, force: bool) -> None:
        if not ep.target.follows or ep.runner is None or ep.state != READY:
            return
        ep.last_poll = time.time()
        try:
            resolved = await self.registry.resolve(ep.spec.model_uri, example=True)
        except ResolveError as exc:
            ep.poll_failures += 1
            ep.last_poll_error = str(exc)
            log.warning("endpoint %s: registry poll failed, %s keeps serving: %s",
                        ep.spec.label, ep.version, exc)
            return
        ep.last_poll_error = None
        if resolved.version == ep.version:
            return
        if (not force and resolved.version == ep.failed_version
                and time.monotonic() < ep.cutover_retry_at):
            return
        await self._cutover(ep, resolved)

    async def _cutover(self, ep: Endpoint, resolved: Resolved) -> None:
        blue = ep.runner
        ep.pending_version = resolved.version
        log.info("endpoint %s: cutover %s -> %s starting", ep.spec.label, ep.version,
                 resolved.version)
        try:
            green = await self._launch_pending(ep, resolved)
        except RunnerError as exc:
            ep.cutover_failures += 1
            wait = backoff(ep.cutover_failures)
            ep.failed_version, ep.cutover_retry_at = resolved.version, time.monotonic() + wait
            ep.last_error = f"cutover to version {resolved.version} failed: {exc}"
            log.error("endpoint %s: %s (version %s keeps serving; retry in %.0fs)",
                      ep.spec.label, ep.last_error, ep.version, wait)
            return
        finally:
            ep.pending, ep.pending_version = None, None
        if ep.runner is not blue:  # blue died or was stopped meanwhile: green serves anyway
            blue = ep.runner
        ep.runner, ep.version, ep.state = green, resolved.version, READY
        ep.last_error, ep.failed_version, ep.cutover_failures = None, None, 0
        log.info("endpoint %s: now serving version %s", ep.spec.label, resolved.version)
        if blue is not None:
            self._spawn(self._drain(blue, ep.spec.drain_timeout), f"drain-{blue.port}")

    async def _launch_pending(self, ep: Endpoint, resolved: Resolved) -> Runner:
        green = await self._launch(ep, resolved, pending=True)
        if resolved.example:
            await self._warm_up(green, resolved.example)
        return green

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
        except (TimeoutError, aiohttp.ClientError) as exc:
            await runner.stop(grace=2)
            raise RunnerStartError(f"warm-up prediction failed: {exc!r}") from exc
        if resp.status != 200:
            await runner.stop(grace=2)
            raise RunnerStartError(f"warm-up prediction answered {resp.status}: "
                                   f"{body[:300].decode(errors='replace')}")

    async def _drain(self, runner: Runner, timeout: float) -> None:
        """Let requests bound to ``runner`` finish (up to ``timeout``), then stop it."""
        runner.stopping = True
        try:
            await asyncio.wait_for(runner.drained.wait(), timeout)
        except TimeoutError:
            log.warning("runner pid %s still had %d requests after drain_timeout; stopping",
                        runner.pid, runner.in_flight)
        await runner.stop(grace=10)

    async def stop_endpoint(self, ep: Endpoint) -> None:
        runner = ep.runner
        if runner is not None:
            ep.runner, ep.state = None, STOPPING
            await self._drain(runner, ep.spec.drain_timeout)
            if ep.state == STOPPING:
                ep.state = COLD
