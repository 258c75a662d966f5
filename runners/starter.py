"""RunnerStarter: launching a runner for a resolved version, and an endpoint's cold start.

A cold start resolves the endpoint's target, reserves a slot in the pool, launches the
runner and waits until it answers ``/ping``. What it does when that fails:

- The endpoint served a version before (``last_good``) and the new target does not
  start: the last good version is started instead, and ``failed_version`` is reported
  exactly as after a failed warm cutover (the watcher tries the new one again later).
- A version that failed moments ago is not tried again before its backoff ends; the
  last good one is started instead, when there is one.
- Nothing to fall back to: the endpoint is FAILED until the backoff ends. A request
  during the backoff re-resolves (at most once a second) and starts at once when the
  alias or stage has moved since; otherwise it gets 503 with ``Retry-After``.
- The registry cannot be reached: the last good version is started, when there is one.
- The endpoint has a ``rollout`` and served another version before (in this run, or in
  the last one: ``rollout_journal``): that version is started, and the new one is rolled
  out beside it at once. A version rolled back is not started at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from .endpoint import Endpoint, Phase, State
from .environment import default_cache_dir, prepare_environment
from .errors import PoolBusy, ResolveError, RunnerError, RunnerStartError, StartBackoff
from .events import PoolEvents
from .launch import (
    LaunchSpec,
    RunnerProcess,
    effective_launcher,
    model_env_vars,
    needs_tcp,
    uses_socket,
)
from .ports import PortAllocator
from .registry import Resolved
from .rollout_journal import RolloutJournal
from .runner import Runner
from .spec import PoolSpec
from .watchdog import Watchdog

log = logging.getLogger("model_gateway.pool")

RECHECK_INTERVAL = 1.0  # a failed endpoint re-resolves at most this often for requests


class StartHost(Protocol):
    """What the starter needs of the pool that owns it."""

    spec: PoolSpec
    env: dict[str, str]
    events: PoolEvents
    ports: PortAllocator
    watchdog: Watchdog
    journal: RolloutJournal

    async def resolve(self, uri: str, *, example: bool = False) -> Resolved: ...

    def reserve(self, ep: Endpoint) -> AbstractAsyncContextManager[None]: ...

    def adopt(self, ep: Endpoint, runner: Runner) -> None: ...

    def socket_path(self) -> str: ...

    async def fork(self, spec: LaunchSpec) -> RunnerProcess: ...


class RunnerStarter:
    def __init__(self, host: StartHost) -> None:
        self.host = host
        self._rechecks: dict[tuple[str, str], tuple[float, asyncio.Task[Resolved]]] = {}

    # -- an endpoint's cold start ---------------------------------------------------------
    async def ensure(self, ep: Endpoint) -> Runner:
        """The runner of ``ep``'s cold start, begun unless one is under way; waits up to
        ``startup_timeout``."""
        if ep.start_task is None:
            moved: Resolved | None = None
            wait = ep.backing_off()
            if wait > 0:
                moved = await self._moved_since_failure(ep)
                if moved is None:
                    raise StartBackoff(ep.last_error or "start failed", retry_after=wait)
            if ep.start_task is None:  # nobody began one while we re-resolved
                ep.start_task = asyncio.create_task(self._cold_start(ep, moved),
                                                    name=f"start-{ep.label}")
        try:
            return await asyncio.wait_for(asyncio.shield(ep.start_task), ep.spec.startup_timeout)
        except TimeoutError as exc:
            raise RunnerStartError(f"{ep.label} not ready within startup_timeout "
                                   f"({ep.spec.startup_timeout:.0f}s)", retry_after=5) from exc

    async def _moved_since_failure(self, ep: Endpoint) -> Resolved | None:
        """The endpoint's target now, when it names another version than the one that
        failed; None when it does not, or cannot be resolved."""
        if not ep.target.follows:
            return None
        checked, task = self._rechecks.get(ep.key, (0.0, None))
        if task is None or (task.done() and time.monotonic() - checked >= RECHECK_INTERVAL):
            task = asyncio.create_task(self.host.resolve(ep.spec.model_uri),
                                       name=f"recheck-{ep.label}")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen
            self._rechecks[ep.key] = (time.monotonic(), task)
        try:
            resolved = await asyncio.shield(task)
        except RunnerError:
            return None
        return resolved if resolved.version != ep.failed_version else None

    async def _cold_start(self, ep: Endpoint, resolved: Resolved | None) -> Runner:
        ep.begin_start()
        began = time.monotonic()
        target = resolved
        try:
            if target is None:
                target = await self._target(ep)
            try:
                runner = await self._start_reserved(ep, target)
            except PoolBusy:
                raise
            except RunnerStartError as exc:
                fallback = ep.last_good
                if fallback is None or fallback.version == target.version:
                    raise
                wait = ep.version_failed(target.version, str(exc))
                self.host.events.cold_start(ep, time.monotonic() - began, False)
                log.error("endpoint %s: version %s failed to start (tried again in %.0fs); "
                          "starting the last good version %s: %s", ep.label, target.version,
                          wait, fallback.version, exc)
                target = fallback
                runner = await self._start_reserved(ep, target)
            ep.started(runner, target)
            self.host.journal.save(ep)
            if ep.spec.rollout is not None and ep.target.follows:
                ep.next_poll = -1.0  # the watcher looks at once: a rollout may be due
            self.host.events.cold_start(ep, time.monotonic() - began, True)
            return runner
        except PoolBusy:  # the pool is full, not the endpoint's fault: no backoff
            ep.start_abandoned()
            raise
        except RunnerError as exc:
            wait = ep.start_failed(target.version if target else None, str(exc))
            if isinstance(exc, RunnerStartError):
                exc.retry_after = wait
            self.host.events.cold_start(ep, time.monotonic() - began, False)
            log.error("endpoint %s failed to start (retry in %.0fs): %s", ep.label, wait, exc)
            raise
        except asyncio.CancelledError:
            ep.start_abandoned()
            raise
        finally:
            ep.start_task = None

    async def _target(self, ep: Endpoint) -> Resolved:
        """What a cold start serves: the target now, unless it failed moments ago or the
        registry is unreachable and a last good version is known."""
        last_good = ep.last_good
        try:
            target = await self.host.resolve(ep.spec.model_uri)
        except ResolveError as exc:
            if last_good is None:
                raise RunnerStartError(f"cannot resolve {ep.spec.model_uri}: {exc}") from exc
            ep.last_poll_error = str(exc)
            log.warning("endpoint %s: cannot resolve %s (%s); starting the last good "
                        "version %s", ep.label, ep.spec.model_uri, exc, last_good.version)
            return last_good
        if (last_good is not None and ep.failures and target.version == ep.failed_version
                and time.monotonic() < ep.retry_at):
            return last_good  # known bad for now: the watcher tries it again later
        if last_good is not None and target.version != last_good.version and (
                ep.spec.rollout is not None
                or (ep.rolled_back is not None and target.version == ep.rolled_back[0])):
            log.info("endpoint %s: starting version %s, which served last (version %s is "
                     "rolled out beside it, unless it was rolled back)", ep.label,
                     last_good.version, target.version)
            return last_good
        return target

    async def _start_reserved(self, ep: Endpoint, target: Resolved) -> Runner:
        async with self.host.reserve(ep):
            return await self.launch(ep, target, on_phase=lambda phase: _cold_phase(ep, phase))

    # -- one runner -----------------------------------------------------------------------
    async def launch(self, ep: Endpoint, target: Resolved, on_phase: Callable[[Phase], None],
                     on_runner: Callable[[Runner], None] | None = None) -> Runner:
        """Start a runner for ``target`` and wait until it answers /ping; it is the pool's
        (``adopt``) from its creation, so it is stopped whatever happens next.
        ``on_phase``: building its environment / starting; ``on_runner``: it exists."""
        host = self.host
        deadline = time.monotonic() + ep.spec.startup_timeout
        launcher = effective_launcher(ep.spec)
        python: Path | None = None
        model_path = target.uri
        env = host.env
        if launcher == "env":
            on_phase(Phase.BUILDING_ENV)
            cache = Path(host.spec.env_cache_dir) if host.spec.env_cache_dir \
                else default_cache_dir()
            extra = {"endpoint": ep.label, "version": target.version}
            python, model_dir = await prepare_environment(
                target.uri, ep.spec.env_manager, cache, deadline=deadline, env=host.env,
                on_output=lambda line: log.debug(line, extra=extra))
            on_phase(Phase.STARTING)
            env, model_path = model_env_vars(host.env, python), str(model_dir)
        for attempt in (1, 2):
            port = host.ports.acquire() if needs_tcp(ep.spec, host.spec) else None
            socket = host.socket_path() if uses_socket(ep.spec, host.spec) else None
            spec = LaunchSpec(label=ep.label, version=target.version, model_uri=model_path,
                              port=port, socket=socket, launcher=launcher, env=env,
                              workers=ep.spec.workers, request_timeout=ep.spec.request_timeout,
                              python=python, env_manager=ep.spec.env_manager,
                              nice=ep.spec.nice)
            runner = Runner(ep.spec, spec, host.fork, model_uri=target.uri)
            host.adopt(ep, runner)
            if on_runner is not None:
                on_runner(runner)
            try:
                await runner.start()
                if runner.pid:
                    host.watchdog.watch(runner.pid)
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
            log.info("endpoint %s version %s ready in %.1fs (pid %s)", ep.label,
                     target.version or "-", time.time() - (runner.started_at or 0), runner.pid)
            return runner
        raise AssertionError("unreachable")


def _cold_phase(ep: Endpoint, phase: Phase) -> None:
    if phase is Phase.BUILDING_ENV:
        ep.building_env()
    elif phase is Phase.STARTING and ep.state is State.BUILDING_ENV:
        ep.env_built()
