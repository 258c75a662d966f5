"""RunnerPool: owns every runner; admits requests, binds them, and keeps within capacity.

- **Admission and binding**: :meth:`acquire` returns a bound runner (started if needed,
  through the starter); :meth:`release` unbinds it. A request is bound to the runner it
  got, so a cutover moves only new requests; nothing is sent to a runner being stopped.
- **Capacity**: ``max_runners`` and ``memory_limit`` count live runners and cold starts
  under way (a cutover's green may exceed them by itself while it starts). A start that
  does not fit evicts the least recently used idle runner; a runner is never chosen
  while requests wait for it, nor before it has served for as long as it took to start
  (``min_residency``), so that an over-committed pool serves between starts instead of
  thrashing.
- The rest lives beside it: cold starts (``starter``), the helper processes
  (``supervisor``), idle eviction, memory and health (``housekeeping``), cutovers
  (``watcher``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import signal
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any

from .endpoint import Endpoint, State
from .errors import HelperUnavailable, PoolBusy, ResolveError
from .events import PoolEvents
from .forked import Zygote
from .housekeeping import Housekeeping
from .launch import Fork, LaunchSpec, RunnerProcess, effective_launcher, runner_env
from .ports import PortAllocator
from .process import find_leftovers, kill_group, runtime_dir
from .registry import RegistryClient, Resolved, needs_registry
from .rollout_journal import RolloutJournal
from .runner import Runner
from .spec import EndpointSpec, PoolSpec
from .starter import RunnerStarter
from .supervisor import Supervisor
from .watchdog import Watchdog

log = logging.getLogger("model_gateway.pool")

DEFAULT_RUNNER_BYTES = 300 * 2**20  # expected size of a runner never measured yet
HELPER_TIMEOUT = 120.0  # how long a start waits for the zygote or the resolver


class RunnerPool:
    def __init__(self, spec: PoolSpec, endpoints: Iterable[EndpointSpec], owner: str,
                 events: PoolEvents | None = None, *, fork: Fork | None = None) -> None:
        """``fork``: where the fork launcher's processes come from (default: the zygote)."""
        self.spec = spec
        self.owner = owner
        self.events = events or PoolEvents()
        self.endpoints: dict[tuple[str, str], Endpoint] = {e.key: Endpoint(e) for e in endpoints}
        self.journal = RolloutJournal(spec.state_dir)
        for ep in self.endpoints.values():
            self.journal.restore(ep)
        self.env = runner_env(spec, owner)
        self.supervisor = Supervisor()
        self.registry = RegistryClient(self.env)
        self.zygote = Zygote(self.env)
        self.watchdog = Watchdog(self.env)
        self.ports = PortAllocator()
        self._fork = fork
        self.starter = RunnerStarter(self)
        self.housekeeping = Housekeeping(self)
        self.runners: set[Runner] = set()  # every runner whose process may be alive
        self.socket_dir = runtime_dir(owner)
        self._sockets = itertools.count(1)
        self._reserved: list[int] = []  # expected bytes of cold starts not launched yet
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        for pgid in find_leftovers(self.owner):
            log.warning("stopping leftover process group %s of an earlier gateway", pgid)
            kill_group(pgid, signal.SIGKILL)
        shutil.rmtree(self.socket_dir, ignore_errors=True)  # an earlier gateway's sockets
        # Before any runner: the watchdog must hold every group.
        await self.supervisor.running(self.watchdog, HELPER_TIMEOUT)
        self._supervise_helpers()
        self.spawn(self.housekeeping.run(), "housekeeping")
        for ep in self.endpoints.values():
            if ep.spec.preload:
                self.spawn(self._preload(ep), f"preload-{ep.label}")

    def _supervise_helpers(self) -> None:
        """Start the helpers the declared endpoints need now, not on the first request:
        the zygote imports MLflow once for every forked runner, the resolver answers the
        registry."""
        specs = [ep.spec for ep in self.endpoints.values()]
        forked = [s.model_uri for s in specs if effective_launcher(s) == "fork"]
        if self._fork is None and forked:
            if self.zygote.name not in self.supervisor:
                # Read at the zygote's start: it imports these models' flavours too.
                self.zygote.models = list(dict.fromkeys(forked))
            self.supervisor.supervise(self.zygote)
        if any(needs_registry(s.model_uri) for s in specs):
            self.supervisor.supervise(self.registry)

    async def close(self) -> None:
        """Stop every runner (SIGTERM, then SIGKILL of its group), then the helpers."""
        runners = list(self.runners)
        refreshes = [ep.refresh_task for ep in self.endpoints.values() if ep.refresh_task]
        for task in [*self._tasks, *refreshes]:  # a refresh may be a rollout's loop
            task.cancel()
        await asyncio.gather(*self._tasks, *refreshes, return_exceptions=True)
        for ep in self.endpoints.values():
            if ep.start_task is not None:
                ep.start_task.cancel()
        runners += [r for r in self.runners if r not in runners]  # started meanwhile
        await asyncio.gather(*(r.stop(grace=10) for r in runners), return_exceptions=True)
        for runner in runners:
            if runner.pid:
                self.watchdog.unwatch(runner.pid)
        await self.supervisor.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task the pool keeps a reference to and cancels on close."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _preload(self, ep: Endpoint) -> None:
        try:
            await self.warm(ep)
        except Exception as exc:  # noqa: BLE001 - logged; status and /readyz show it
            log.error("preloading %s failed: %s", ep.label, exc)

    def not_ready(self) -> list[str]:
        """What keeps the gateway from being ready: helper processes still starting, and
        preloaded endpoints without a ready runner, as ``what: state``."""
        return [*self.supervisor.waiting(),
                *(f"{ep.label}: {ep.state.value}" for ep in self.endpoints.values()
                  if ep.spec.preload and ep.state is not State.READY)]

    @property
    def memory(self) -> int:
        return sum(r.memory for r in self.runners)

    # -- what starts need (RunnerStarter's host) ------------------------------------------
    async def resolve(self, uri: str, *, example: bool = False) -> Resolved:
        if needs_registry(uri) or example:
            try:
                await self.supervisor.running(self.registry, HELPER_TIMEOUT)
            except HelperUnavailable as exc:
                raise ResolveError(str(exc)) from exc
        return await self.registry.resolve(uri, example=example)

    async def fork(self, spec: LaunchSpec) -> RunnerProcess:
        """The fork launcher: the zygote (restarted by the supervisor if it died) forks."""
        if self._fork is not None:
            return await self._fork(spec)
        zygote = await self.supervisor.running(self.zygote, HELPER_TIMEOUT)
        return await zygote.fork(spec)

    def socket_path(self) -> str:
        """A new runner's unix socket, in the pool's private directory."""
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return str(self.socket_dir / f"runner-{next(self._sockets)}.sock")

    def adopt(self, ep: Endpoint, runner: Runner) -> None:
        """``runner`` is the pool's from now on: counted, and reaped when it exits."""
        self.runners.add(runner)
        self.spawn(self._reap(ep, runner), f"reap-{runner.port}")

    async def _reap(self, ep: Endpoint, runner: Runner) -> None:
        """Wait for a runner's exit: forget it, and fail its endpoint if it crashed. (At
        close this is cancelled; close() stops every runner itself.)"""
        await runner.exited.wait()
        self.runners.discard(runner)
        if runner.port is not None:
            self.ports.release(runner.port)
        self._notify_slot()
        ep.last_output = runner.tail()
        self.notice_exit(ep, runner)
        await runner.stop(grace=1)  # closes its client, kills any stragglers
        if runner.pid:
            self.watchdog.unwatch(runner.pid)

    def notice_exit(self, ep: Endpoint, runner: Runner) -> None:
        """``runner`` exited: if it was serving ``ep`` (not being stopped), ``ep`` lost it
        and the next request starts another; if it was a rollout's new version, the
        rollout is rolled back. Also called by a request that finds the exit before the
        reaper does."""
        cutover = ep.cutover
        if cutover is not None and cutover.rollout is not None and runner is cutover.runner \
                and runner.exited.is_set() and not runner.stopping:
            reason = runner.kill_reason or f"runner exited with code {runner.returncode}"
            cutover.rollout.roll_back(f"the new version's runner failed: {reason}")
        if ep.runner is runner and runner.exited.is_set() and not runner.stopping:
            reason = runner.kill_reason or f"runner exited with code {runner.returncode}"
            ep.runner_lost(runner, runner.failure(reason))
            self.events.restart(ep)
            log.error("endpoint %s: runner pid %s: %s", ep.label, runner.pid, reason)

    # -- requests -------------------------------------------------------------------------
    async def acquire(self, ep: Endpoint,
                      headers: list[tuple[bytes, bytes]] | None = None) -> Runner:
        """A serving runner for one request, bound to it (started if needed); release() it
        afterwards. ``headers``: the request's, for a rollout's sticky header."""
        if ep.slots is not None:
            try:
                await asyncio.wait_for(ep.slots.acquire(), self.spec.queue_timeout)
            except TimeoutError as exc:
                raise PoolBusy(f"{ep.spec.max_concurrency} requests already in flight for "
                               f"{ep.label}", retry_after=1) from exc
        ep.waiters += 1  # from here until bound, its runner is not evicted
        try:
            while True:
                runner = ep.pick(headers)
                if runner is not None and not runner.serving:
                    self.notice_exit(ep, runner)
                    runner = None
                if runner is None:
                    runner = await self.starter.ensure(ep)
                if runner.serving:
                    runner.bind()
                    return runner
        except BaseException:
            if ep.slots is not None:
                ep.slots.release()
            raise
        finally:
            ep.waiters -= 1

    def acquire_now(self, ep: Endpoint,
                    headers: list[tuple[bytes, bytes]] | None = None) -> Runner | None:
        """``acquire`` when it would not wait: the endpoint's serving runner, bound, if no
        start or ``max_concurrency`` queue is in the way; else None (use ``acquire``)."""
        runner = ep.pick(headers)
        if ep.slots is not None or runner is None or not runner.serving:
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
        """Start ``ep``'s runner now if it is cold (an operator warming it up, preload)."""
        runner = ep.runner
        if runner is not None and runner.serving:
            return runner
        if runner is not None:
            self.notice_exit(ep, runner)
        return await self.starter.ensure(ep)

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

    def evictable(self, ep: Endpoint) -> bool:
        """Whether ``ep``'s runner may be stopped to free its slot: idle, no request
        waiting for it, no cutover beside it, not pinned."""
        runner = ep.runner
        return (runner is not None and ep.state is State.READY and not ep.spec.pinned
                and runner.in_flight == 0 and ep.waiters == 0 and ep.cutover is None
                and not runner.stopping)

    def _residency_left(self, runner: Runner, now: float) -> float:
        """Seconds until ``runner`` may be evicted for a start: ``min_residency`` after it
        became ready, or by default as long as it took to start."""
        ready = runner.ready_at or now
        stay = self.spec.min_residency
        if stay is None:
            stay = ready - (runner.launched_at or ready)
        return stay - (now - ready)

    def _victim(self, now: float) -> tuple[Runner | None, float]:
        """The least recently used runner that may be evicted for a start, and else how
        long until one leaves its minimum residency (inf: none will)."""
        candidates = [ep.runner for ep in self.endpoints.values() if self.evictable(ep)]
        left = {r: self._residency_left(r, now) for r in candidates if r is not None}
        settled = [r for r, wait in left.items() if wait <= 0]
        if settled:
            return min(settled, key=lambda r: r.last_used), 0.0
        return None, min(left.values(), default=float("inf"))

    @contextlib.asynccontextmanager
    async def reserve(self, ep: Endpoint) -> AsyncIterator[None]:
        """Hold room for one more runner while ``ep``'s cold start launches it, evicting
        idle runners as needed; PoolBusy after ``queue_timeout``."""
        expected = self._expected_bytes(ep)
        deadline = time.monotonic() + self.spec.queue_timeout
        while (reason := self._over(expected)) is not None:
            now = time.monotonic()
            victim, settles_in = self._victim(now)
            if victim is not None:
                await self.evict(victim, reason=reason)
                continue
            remaining = deadline - now
            if remaining <= 0:
                what = (f"all {self.spec.max_runners} runners are busy" if reason == "capacity"
                        else "the pool's memory_limit is taken by busy runners")
                raise PoolBusy(what, retry_after=2)
            freed = self._slot_freed
            try:
                await asyncio.wait_for(freed.wait(), min(remaining, settles_in))
            except TimeoutError:
                pass
        self._reserved.append(expected)
        try:
            yield
        finally:
            self._reserved.remove(expected)

    async def evict(self, runner: Runner, *, reason: str) -> None:
        """Detach an idle runner from its endpoint (which goes cold) and stop it."""
        for ep in self.endpoints.values():
            if ep.runner is runner:
                ep.evicted()
                self.events.eviction(ep, reason)
                log.info("evicting %s version %s (%s)", ep.label, runner.version or "-",
                         reason)
        await runner.stop(grace=5)
        # Forget it now, not when its reaper next runs: the caller counts runners right
        # after this returns and would otherwise evict a second one.
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

    # -- declared endpoints ---------------------------------------------------------------
    def add_endpoint(self, spec: EndpointSpec) -> Endpoint:
        ep = Endpoint(spec)
        self.journal.restore(ep)
        self.endpoints[spec.key] = ep
        self._supervise_helpers()
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
        """Take an endpoint's runner out of service, drained; the endpoint goes cold. A
        cutover in progress is cancelled (its green runner stopped)."""
        if ep.refresh_task is not None and ep.cutover is not None:
            ep.refresh_task.cancel()
            await asyncio.gather(ep.refresh_task, return_exceptions=True)
        if ep.state is State.FAILED:
            ep.reset()
        if ep.state is State.READY:
            runner = ep.begin_stop()
            await self.drain(runner, ep.spec.drain_timeout)
            ep.stopped()
