"""RunnerPool: owns every runner process; starts them lazily, evicts, reaps, watches health."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from .endpoint import BUILDING_ENV, COLD, FAILED, READY, STARTING, STOPPING, Endpoint, backoff
from .environment import build_environment, default_cache_dir, download_model
from .errors import PoolBusy, ResolveError, RunnerError, RunnerStartError, StartBackoff
from .events import PoolEvents
from .forked import ForkedProcess, Zygote
from .launch import (
    effective_launcher,
    find_leftovers,
    kill_group,
    model_env_vars,
    runner_env,
    spawn,
)
from .memory import group_memory
from .ports import PortAllocator
from .registry import RegistryClient, Resolved
from .runner import Runner
from .spec import EndpointSpec, PoolSpec
from .watchdog import Watchdog

log = logging.getLogger("model_gateway.pool")

DEFAULT_RUNNER_BYTES = 300 * 2**20  # expected size of a runner never measured yet
HEALTH_TIMEOUT = 5.0  # an idle runner whose /ping takes longer than this is hung
HEALTH_STRIKES = 2  # consecutive failed pings before a runner is killed


class RunnerPool:
    """The only owner of runner processes.

    Requests call :meth:`acquire` / :meth:`release`; a request is bound to the runner
    :meth:`acquire` returns, so swapping ``endpoint.runner`` (a cutover) moves only new
    requests. ``max_runners`` and ``memory_limit`` count live and starting runners; a
    cutover's green runner may exceed them by itself while it starts.
    """

    def __init__(self, spec: PoolSpec, endpoints: Iterable[EndpointSpec], owner: str,
                 events: PoolEvents | None = None) -> None:
        self.spec = spec
        self.owner = owner
        self.events = events or PoolEvents()
        self.endpoints: dict[tuple[str, str], Endpoint] = {e.key: Endpoint(e) for e in endpoints}
        self.env = runner_env(spec, owner)
        self.registry = RegistryClient(self.env)
        self.watchdog = Watchdog(self.env)
        self.ports = PortAllocator()
        self.runners: set[Runner] = set()  # every runner whose process may be alive
        self._reserved: list[int] = []  # expected bytes of cold starts not launched yet
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._zygote: asyncio.Task[Zygote] | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        for pgid in find_leftovers(self.owner):
            log.warning("stopping leftover process group %s of an earlier gateway", pgid)
            kill_group(pgid, signal.SIGKILL)
        await self.watchdog.start()
        self.spawn(self.registry.start(), "registry-start")
        self.spawn(self._housekeeping(), "housekeeping")
        if any(effective_launcher(ep.spec) == "fork" for ep in self.endpoints.values()):
            self._start_zygote()  # import MLflow once, now, not on the first cold request
        for ep in self.endpoints.values():
            if ep.spec.preload:
                self.spawn(self._preload(ep), f"preload-{ep.spec.label}")

    def _start_zygote(self) -> asyncio.Task[Zygote]:
        task = self._zygote
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None
                                             or not task.result().is_alive)):
            async def start() -> Zygote:
                zygote = Zygote(self.env)
                await zygote.start()
                return zygote
            task = self._zygote = asyncio.create_task(start(), name="zygote-start")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen, not lost
        return task

    async def _fork(self, argv: list[str], env: dict[str, str]) -> ForkedProcess:
        """The fork launcher: the zygote (started again if it died) forks the runner."""
        zygote = await asyncio.shield(self._start_zygote())
        return await zygote.spawn(argv, env)

    async def close(self) -> None:
        """Stop every runner (SIGTERM, then SIGKILL of its group), the resolver, the watchdog."""
        runners = list(self.runners)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(r.stop(grace=10) for r in runners), return_exceptions=True)
        for runner in runners:
            if runner.pid:
                self.watchdog.unwatch(runner.pid)
        for ep in self.endpoints.values():
            ep.runner, ep.pending, ep.state = None, None, COLD
        await self._close_zygote()
        await self.registry.close()
        await self.watchdog.close()

    async def _close_zygote(self) -> None:
        task, self._zygote = self._zygote, None
        if task is None:
            return
        task.cancel()
        try:
            zygote = await task
        except (asyncio.CancelledError, RunnerError):
            return
        await zygote.close()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task the pool keeps a reference to and cancels on close."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _preload(self, ep: Endpoint) -> None:
        try:
            await self._ensure_runner(ep)
        except RunnerError as exc:
            log.error("preloading %s failed: %s", ep.spec.label, exc)

    def not_ready(self) -> list[str]:
        """Preloaded endpoints without a ready runner, as ``label: state``."""
        return [f"{ep.spec.label}: {ep.state}" for ep in self.endpoints.values()
                if ep.spec.preload and ep.state != READY]

    @property
    def memory(self) -> int:
        return sum(r.memory for r in self.runners)

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

    def acquire_now(self, ep: Endpoint) -> Runner | None:
        """``acquire`` when it would not wait: the endpoint's serving runner, bound, if no
        start or ``max_concurrency`` queue is in the way; else None (use ``acquire``)."""
        runner = ep.runner
        if ep.slots is not None or runner is None or not runner.is_alive or runner.stopping:
            return None
        runner.bind()
        return runner

    def release(self, ep: Endpoint, runner: Runner) -> None:
        runner.unbind()
        if ep.slots is not None:
            ep.slots.release()
        if runner.in_flight == 0:
            self._notify_slot()

    async def warm(self, ep: Endpoint) -> Runner:
        """Start ``ep``'s runner now if it is cold (an operator warming it up)."""
        runner = ep.runner
        if runner is not None and runner.is_alive and not runner.stopping:
            return runner
        return await self._ensure_runner(ep)

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
        began = time.monotonic()
        try:
            try:
                resolved = await self.registry.resolve(ep.spec.model_uri)
            except ResolveError as exc:
                raise RunnerStartError(f"cannot resolve {ep.spec.model_uri}: {exc}") from exc
            expected = await self._reserve_slot(ep)
            try:
                runner = await self.launch(ep, resolved)
            finally:
                self._reserved.remove(expected)
            ep.runner, ep.version, ep.state = runner, resolved.version, READY
            ep.last_error, ep.failed_version, ep.start_failures = None, None, 0
            self.events.cold_start(ep, time.monotonic() - began, True)
            return runner
        except PoolBusy:  # the pool is full, not the endpoint's fault: no backoff
            ep.state = COLD
            raise
        except RunnerError as exc:
            ep.state, ep.last_error = FAILED, str(exc)
            ep.start_failures += 1
            wait = backoff(ep.start_failures)
            ep.retry_at = time.monotonic() + wait
            if isinstance(exc, RunnerStartError):
                exc.retry_after = wait
            self.events.cold_start(ep, time.monotonic() - began, False)
            log.error("endpoint %s failed to start (retry in %.0fs): %s", ep.spec.label, wait, exc)
            raise
        except asyncio.CancelledError:
            ep.state = COLD
            raise
        finally:
            ep.start_task = None

    async def _prepare_env(self, ep: Endpoint, resolved: Resolved, deadline: float, *,
                           pending: bool) -> tuple[Path, Path]:
        """Download the model and build (or reuse) its environment: (python, model dir).

        Counts toward startup_timeout; shown as ``building_env`` (``pending_state`` during
        a cutover, while blue keeps serving)."""
        def mark(state: str) -> None:
            if pending:
                ep.pending_state = state
            elif ep.state in (STARTING, BUILDING_ENV):
                ep.state = state

        cache = Path(self.spec.env_cache_dir) if self.spec.env_cache_dir else default_cache_dir()
        extra = {"endpoint": ep.spec.label, "version": resolved.version}
        mark(BUILDING_ENV)
        model_dir = await download_model(resolved.uri, cache / "models", env=self.env,
                                         timeout=max(0.0, deadline - time.monotonic()))
        python = await build_environment(
            model_dir, ep.spec.env_manager, cache, env=self.env,
            timeout=max(0.0, deadline - time.monotonic()),
            on_output=lambda line: log.debug(line, extra=extra))
        mark(STARTING)
        return python, model_dir

    async def launch(self, ep: Endpoint, resolved: Resolved, *, pending: bool = False) -> Runner:
        """Start a runner for ``resolved`` and wait until it answers /ping."""
        deadline = time.monotonic() + ep.spec.startup_timeout
        launcher = effective_launcher(ep.spec)
        python: Path | None = None
        model_dir: Path | None = None
        env = self.env
        if launcher == "env":
            python, model_dir = await self._prepare_env(ep, resolved, deadline, pending=pending)
            env = model_env_vars(self.env, python)
        for attempt in (1, 2):
            spawner = self._fork if launcher == "fork" else spawn
            runner = Runner(ep.spec, resolved.uri, resolved.version, self.ports.acquire(),
                            env, spawner, python=python,
                            model_path=str(model_dir) if model_dir else None)
            self.runners.add(runner)
            if pending:
                ep.pending = runner
            self.spawn(self._supervise(ep, runner), f"supervise-{runner.port}")
            try:
                await runner.start()
                if runner.pid:
                    self.watchdog.watch(runner.pid)
                await runner.wait_ready(max(1.0, deadline - time.monotonic()))
            except RunnerStartError as exc:
                await runner.stop(grace=2)
                # Another process took the port between our check and the runner's bind.
                if attempt == 1 and "address already in use" in str(exc).lower():
                    log.warning("port %s was taken; retrying on another", runner.port)
                    continue
                raise
            except BaseException:
                await runner.stop(grace=2)
                raise
            log.info("endpoint %s version %s ready on port %s in %.1fs", ep.spec.label,
                     resolved.version or "-", runner.port, time.time() - (runner.started_at or 0))
            return runner
        raise AssertionError("unreachable")

    async def _supervise(self, ep: Endpoint, runner: Runner) -> None:
        """Reap a runner's exit: forget it, and mark its endpoint failed if it crashed."""
        try:
            await runner.exited.wait()
        finally:
            self.runners.discard(runner)
            self.ports.release(runner.port)
            self._notify_slot()
        ep.last_output = runner.tail()
        if ep.runner is runner:
            ep.runner = None
            if runner.stopping:
                ep.state = COLD
            else:
                reason = runner.kill_reason or f"runner exited with code {runner.returncode}"
                ep.state, ep.retry_at = FAILED, time.monotonic()
                ep.last_error = runner.failure(reason)
                self.events.restart(ep)
                log.error("endpoint %s: runner pid %s: %s", ep.spec.label, runner.pid, reason)
        await runner.stop(grace=1)  # close its connection pool, kill any stragglers
        if runner.pid:
            self.watchdog.unwatch(runner.pid)

    # -- capacity -------------------------------------------------------------------------
    def _notify_slot(self) -> None:
        self._slot_freed.set()
        self._slot_freed = asyncio.Event()

    def _expected_bytes(self, ep: Endpoint) -> int:
        if ep.last_memory:
            return ep.last_memory
        sizes = [r.memory for r in self.runners if r.memory]
        return sum(sizes) // len(sizes) if sizes else DEFAULT_RUNNER_BYTES

    def _over(self, expected: int) -> str | None:
        """Why one more runner of ``expected`` bytes does not fit, or None if it does."""
        if len(self.runners) + len(self._reserved) >= self.spec.max_runners:
            return "capacity"
        limit = self.spec.memory_limit
        used = self.memory + sum(self._reserved)
        if limit and (self.runners or self._reserved) and used + expected > limit:
            return "memory"
        return None

    def _lru_idle(self) -> Runner | None:
        idle = [r for ep in self.endpoints.values() if (r := ep.runner) is not None
                and not ep.spec.pinned and r.in_flight == 0 and not r.stopping
                and ep.pending is None]
        return min(idle, key=lambda r: r.last_used, default=None)

    async def _reserve_slot(self, ep: Endpoint) -> int:
        expected = self._expected_bytes(ep)
        deadline = time.monotonic() + self.spec.queue_timeout
        while (reason := self._over(expected)) is not None:
            victim = self._lru_idle()
            if victim is not None:
                await self.evict(victim, reason=reason)
                continue
            freed = self._slot_freed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = (f"all {self.spec.max_runners} runners are busy" if reason == "capacity"
                        else "the pool's memory_limit is taken by busy runners")
                raise PoolBusy(what, retry_after=2)
            try:
                await asyncio.wait_for(freed.wait(), remaining)
            except TimeoutError:
                pass
        self._reserved.append(expected)
        return expected

    async def evict(self, runner: Runner, *, reason: str) -> None:
        """Detach an idle runner from its endpoint (which goes cold) and stop it."""
        for ep in self.endpoints.values():
            if ep.runner is runner:
                ep.runner, ep.state = None, COLD
                self.events.eviction(ep, reason)
                log.info("evicting %s version %s (%s)", ep.spec.label, runner.version or "-",
                         reason)
        await runner.stop(grace=5)
        # Forget it now, not when its supervisor next runs: the caller counts runners
        # right after this returns and would otherwise evict a second one.
        self.runners.discard(runner)

    async def drain(self, runner: Runner, timeout: float) -> None:
        """Let requests bound to ``runner`` finish (up to ``timeout``), then stop it."""
        runner.stopping = True
        try:
            await asyncio.wait_for(runner.drained.wait(), timeout)
        except TimeoutError:
            log.warning("runner pid %s still had %d requests after drain_timeout; stopping",
                        runner.pid, runner.in_flight)
        await runner.stop(grace=10)

    def add_endpoint(self, spec: EndpointSpec) -> Endpoint:
        ep = Endpoint(spec)
        self.endpoints[spec.key] = ep
        if spec.preload:
            self.spawn(self._preload(ep), f"preload-{spec.label}")
        return ep

    async def remove_endpoint(self, key: tuple[str, str]) -> None:
        """Undeclare an endpoint: new requests get 404 at once; its runner drains and stops."""
        ep = self.endpoints.pop(key, None)
        if ep is not None:
            if ep.start_task is not None:
                ep.start_task.cancel()
            await self.stop_endpoint(ep)

    async def stop_endpoint(self, ep: Endpoint) -> None:
        """Take an endpoint's runner out of service, drained; the endpoint goes cold."""
        runner = ep.runner
        if runner is not None:
            ep.runner, ep.state = None, STOPPING
            await self.drain(runner, ep.spec.drain_timeout)
            if ep.state == STOPPING:
                ep.state = COLD

    # -- housekeeping ---------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        """Once a second: idle eviction; every few seconds: memory and health of runners."""
        tick = 0
        while True:
            await asyncio.sleep(1)
            tick += 1
            self._evict_idle()
            if tick % 2 == 0:
                await self._measure()
            if tick % max(1, int(self.spec.health_interval)) == 0:
                await self._check_health()

    def _evict_idle(self) -> None:
        if self.spec.idle_timeout <= 0:
            return
        now = time.monotonic()
        for ep in self.endpoints.values():
            r = ep.runner
            if (r is not None and not ep.spec.pinned and r.in_flight == 0 and not r.stopping
                    and ep.pending is None and now - r.last_used >= self.spec.idle_timeout):
                self.spawn(self.evict(r, reason="idle"), f"evict-{r.port}")

    async def _measure(self) -> None:
        runners = [r for r in self.runners if r.pid and r.is_alive]
        sizes = await asyncio.to_thread(lambda: [group_memory(r.pid or 0) for r in runners])
        for runner, size in zip(runners, sizes, strict=True):
            runner.memory = size
        for ep in self.endpoints.values():
            if ep.runner is not None and ep.runner.memory:
                ep.last_memory = ep.runner.memory

    async def _check_health(self) -> None:
        """Ping idle ready runners; one that stops answering is killed and replaced."""
        for ep in list(self.endpoints.values()):
            runner = ep.runner
            if runner is None or runner.in_flight or runner.stopping or runner.session is None:
                continue
            try:
                async with runner.session.get(
                        f"{runner.base_url}/ping",
                        timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT)) as resp:
                    healthy = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                healthy = runner.in_flight > 0  # busy meanwhile: not evidence of a hang
            runner.health_strikes = 0 if healthy else runner.health_strikes + 1
            if runner.health_strikes >= HEALTH_STRIKES and runner is ep.runner:
                log.error("endpoint %s: runner pid %s did not answer /ping within %.0fs "
                          "%d times; killing it", ep.spec.label, runner.pid, HEALTH_TIMEOUT,
                          HEALTH_STRIKES)
                runner.kill(reason=f"runner hung: /ping did not answer within "
                                   f"{HEALTH_TIMEOUT:.0f}s")
