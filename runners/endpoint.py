"""An endpoint's lifecycle: its states, the legal moves between them, and a cutover's own.

Everything that changes an endpoint's state is a method of :class:`Endpoint` below, one
per :class:`Event`, and every method looks its move up in :data:`TRANSITIONS` (as h11's
``_state.py`` does): an illegal one raises :class:`IllegalTransition` naming the
endpoint, the state and the event. Nothing else assigns ``state``, ``runner`` or
``cutover``.

    COLD ─start→ STARTING ─┬─ready→ READY ─evicted→ COLD
      ▲            │  ▲     │          ├─lost→ FAILED (the next request starts it again)
      │   building_env│env_built       ├─stop→ STOPPING ─stopped→ COLD
      │            ▼  │     │          └─switch (a cutover's green takes over)→ READY
      │        BUILDING_ENV ┴─failed→ FAILED ─start→ STARTING
      └──────── abandoned (pool busy, cancelled) ─┘      └─switch→ READY, ─reset→ COLD

A cutover is its own object (:class:`Cutover`) beside a READY endpoint: blue keeps
serving while green goes STARTING (⇄ BUILDING_ENV) → WARMING (→ ROLLING, when the
endpoint has a rollout: green takes a growing share, see ``rollout``); then green
switches in, or the cutover fails or is rolled back (blue keeps serving) or is cancelled.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from dataclasses import dataclass
from typing import Any

from .backoff import backoff
from .errors import summary
from .registry import Resolved
from .rollout import Rollout
from .runner import Runner
from .spec import EndpointSpec
from .target import ModelTarget


class State(enum.Enum):
    COLD = "cold"
    BUILDING_ENV = "building_env"  # a cold start building the model's environment first
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


class Event(enum.Enum):
    """What happens to an endpoint; each is one method of :class:`Endpoint`."""

    START = "start"
    BUILD_ENV = "build an environment"
    ENV_BUILT = "finish building an environment"
    READY = "become ready"
    FAIL = "fail to start"
    ABANDON = "abandon a start"
    EVICT = "be evicted"
    LOSE = "lose its runner"
    STOP = "stop"
    STOPPED = "finish stopping"
    RESET = "reset"
    SWITCH = "switch to a new version"


class Phase(enum.Enum):
    """Where a cutover's green runner is."""

    STARTING = "starting"
    BUILDING_ENV = "building_env"
    WARMING = "warming"  # answering the warm-up prediction
    ROLLING = "rolling"  # serving a share of the traffic, step by step


S, E, P = State, Event, Phase
# The legal moves: in each state, the events it accepts and the state each leads to.
TRANSITIONS: dict[State, dict[Event, State]] = {
    S.COLD: {E.START: S.STARTING},
    S.STARTING: {E.BUILD_ENV: S.BUILDING_ENV, E.READY: S.READY, E.FAIL: S.FAILED,
                 E.ABANDON: S.COLD},
    S.BUILDING_ENV: {E.ENV_BUILT: S.STARTING, E.FAIL: S.FAILED, E.ABANDON: S.COLD},
    S.READY: {E.SWITCH: S.READY, E.EVICT: S.COLD, E.LOSE: S.FAILED, E.STOP: S.STOPPING},
    S.FAILED: {E.START: S.STARTING, E.SWITCH: S.READY, E.RESET: S.COLD},
    S.STOPPING: {E.STOPPED: S.COLD},
}
PHASES: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({P.STARTING}),
    P.STARTING: frozenset({P.BUILDING_ENV, P.WARMING}),
    P.BUILDING_ENV: frozenset({P.STARTING}),
    P.WARMING: frozenset({P.ROLLING}),
    P.ROLLING: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A lifecycle method was called in a state that does not allow it."""


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(uri: str | None) -> str | None:
    """A URI without credentials (``https://user:token@host`` → ``https://***@host``)."""
    return _USERINFO.sub("***@", uri) if uri else uri


@dataclass
class Cutover:
    """A new version's (green) runner starting beside the serving (blue) one."""

    endpoint: str
    target: Resolved
    phase: Phase | None = None
    runner: Runner | None = None
    began: float = 0.0
    rollout: Rollout | None = None  # while ROLLING

    def __post_init__(self) -> None:
        self.began = time.monotonic()
        self.move(Phase.STARTING)

    @property
    def version(self) -> str | None:
        return self.target.version

    def attach(self, runner: Runner) -> None:
        """Green's runner exists (status shows it as ``pending_runner``)."""
        self.runner = runner

    def move(self, phase: Phase) -> None:
        if phase not in PHASES[self.phase]:
            raise IllegalTransition(f"{self.endpoint}: cutover to version {self.version} "
                                    f"cannot go from {_name(self.phase)} to {phase.value}")
        self.phase = phase


def _name(value: State | Phase | None) -> str:
    return value.value if value is not None else "(none)"


class Endpoint:
    """One declared name/alias: its state, the runner serving it, and what happened."""

    def __init__(self, spec: EndpointSpec) -> None:
        self.spec = spec
        self.target = ModelTarget.parse(spec.model_uri)
        self.slots = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
        self.state = State.COLD
        self.runner: Runner | None = None  # serving (blue)
        self.version: str | None = None
        self.cutover: Cutover | None = None
        self.last_good: Resolved | None = None  # the last version that served
        # The version a rollout rolled back, and why: not tried again until the target
        # names another version, or an operator retries it.
        self.rolled_back: tuple[str | None, str] | None = None
        # The version that failed to start, and when it may be tried again.
        self.failed_version: str | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.start_task: asyncio.Task[Runner] | None = None
        self.waiters = 0  # requests waiting for a runner, not yet bound to one
        self.refresh_task: asyncio.Task[None] | None = None
        self.next_poll = 0.0
        self.last_poll: float | None = None
        self.last_poll_error: str | None = None
        self.poll_failures = 0
        self.last_memory = 0  # bytes its last runner used: the estimate for its next start
        self.last_output: list[str] = []  # the last runner's output, kept after it exited
        # Requests per predict call over the last 100 calls (set by the gateway's batcher).
        self.mean_batch_size: float | None = None
        # Its shadow's settings and tallies since start (set by the gateway's shadow lane).
        self.shadow_stats: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.spec.key

    @property
    def label(self) -> str:
        return self.spec.label

    def _move(self, event: Event) -> None:
        new = TRANSITIONS[self.state].get(event)
        if new is None:
            raise IllegalTransition(f"{self.label}: cannot {event.value} when "
                                    f"{self.state.value}")
        self.state = new

    def use_spec(self, spec: EndpointSpec) -> None:
        """Adopt a changed spec (config reload); runners started from now on use it."""
        self.spec = spec
        self.target = ModelTarget.parse(spec.model_uri)
        self.slots = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
        self.failed_version, self.failures, self.retry_at = None, 0, 0.0

    # -- a cold start ---------------------------------------------------------------------
    def begin_start(self) -> None:
        self._move(Event.START)

    def building_env(self) -> None:
        self._move(Event.BUILD_ENV)

    def env_built(self) -> None:
        self._move(Event.ENV_BUILT)

    def started(self, runner: Runner, resolved: Resolved) -> None:
        """A cold start's runner is ready and serves from now on."""
        self._move(Event.READY)
        self._serve(runner, resolved)
        # A fallback to the last good version keeps reporting the version that failed.
        if self.failures == 0 or resolved.version == self.failed_version:
            self.failed_version, self.failures, self.last_error = None, 0, None

    def version_failed(self, version: str | None, error: str) -> float:
        """``version`` did not start; seconds until it may be tried again. The state does
        not change: blue keeps serving, or a cold start falls back to the last good one."""
        if version != self.failed_version:
            self.failures = 0
        self.failed_version, self.last_error = version, error
        self.failures += 1
        wait = backoff(self.failures)
        self.retry_at = time.monotonic() + wait
        return wait

    def start_failed(self, version: str | None, error: str) -> float:
        """A cold start failed with nothing to fall back to: FAILED until the backoff."""
        wait = self.version_failed(version, error)
        self._move(Event.FAIL)
        return wait

    def start_abandoned(self) -> None:
        """A cold start gave up through no fault of the endpoint (pool busy, cancelled)."""
        self._move(Event.ABANDON)

    def backing_off(self) -> float:
        """Seconds left of a FAILED endpoint's backoff (0 when it may start)."""
        return max(0.0, self.retry_at - time.monotonic()) if self.state is State.FAILED else 0.0

    # -- a serving runner -----------------------------------------------------------------
    def evicted(self) -> Runner:
        """Take the idle runner away to free its slot; the endpoint goes cold."""
        self._move(Event.EVICT)
        return self._take_runner()

    def runner_lost(self, runner: Runner, error: str) -> None:
        """The serving runner exited or hung: FAILED, and the next request starts a new
        one at once (a crash is not a reason to wait)."""
        if runner is not self.runner:
            return
        self._move(Event.LOSE)
        self.runner, self.last_error, self.retry_at = None, error, time.monotonic()

    def begin_stop(self) -> Runner:
        """An operator or a config reload takes the runner out of service, drained."""
        self._move(Event.STOP)
        return self._take_runner()

    def stopped(self) -> None:
        self._move(Event.STOPPED)

    def reset(self) -> None:
        """Forget a failed start: COLD, the next request starts afresh."""
        self._move(Event.RESET)
        self.failed_version, self.failures, self.retry_at = None, 0, 0.0

    def _take_runner(self) -> Runner:
        runner, self.runner = self.runner, None
        assert runner is not None, "a READY endpoint has a runner"
        return runner

    def _serve(self, runner: Runner, resolved: Resolved) -> None:
        self.runner, self.version = runner, resolved.version
        self.last_good = Resolved(version=resolved.version, uri=resolved.uri)

    # -- which runner serves a request -----------------------------------------------------
    def pick(self, headers: list[tuple[bytes, bytes]] | None = None) -> Runner | None:
        """The runner for a new request: blue, or a rolling-out green for its share."""
        cutover = self.cutover
        if cutover is not None and cutover.rollout is not None:
            green = cutover.runner
            if green is not None and green.serving and cutover.rollout.verdict is None \
                    and (self.runner is None or cutover.rollout.routes_new(headers)):
                return green
        return self.runner

    def observe(self, runner: Runner, status: int | None, seconds: float) -> None:
        """A caller's answer from ``runner``: counted when a rollout is judging it."""
        cutover = self.cutover
        rollout = cutover.rollout if cutover is not None else None
        if rollout is not None and status != 499:  # 499: the caller left, no verdict
            if runner is cutover.runner:  # type: ignore[union-attr]
                rollout.observe(True, status, seconds)
            elif runner is self.runner:
                rollout.observe(False, status, seconds)

    # -- a cutover ------------------------------------------------------------------------
    def begin_cutover(self, target: Resolved) -> Cutover:
        if self.state is not State.READY or self.cutover is not None:
            raise IllegalTransition(f"{self.label}: cannot begin a cutover when "
                                    f"{self.state.value}"
                                    + (" with another in progress" if self.cutover else ""))
        self.cutover = Cutover(self.label, target)
        return self.cutover

    def switch(self, cutover: Cutover, green: Runner) -> Runner | None:
        """Green serves from now on; blue (returned, if any) is to be drained. Requests
        already bound to blue finish there."""
        if cutover.phase not in (Phase.WARMING, Phase.ROLLING):
            raise IllegalTransition(f"{self.label}: cutover switched before warming up")
        self._move(Event.SWITCH)
        self._end(cutover)
        blue, cutover.runner = self.runner, None
        self._serve(green, cutover.target)
        self.last_error, self.failed_version, self.failures = None, None, 0
        return blue

    def begin_rollout(self, cutover: Cutover, rollout: Rollout) -> None:
        """Warm green serves a growing share beside blue; a new rollout's version is no
        longer the one rolled back."""
        cutover.move(Phase.ROLLING)
        cutover.rollout = rollout
        self.rolled_back = None

    def roll_back(self, cutover: Cutover, reason: str) -> Runner | None:
        """All traffic back on blue; green (returned, if any) is to be stopped."""
        self._end(cutover)
        green, cutover.runner = cutover.runner, None
        self.rolled_back = (cutover.version, reason)
        return green

    def cutover_failed(self, cutover: Cutover, error: str) -> float:
        """Green did not become ready; blue keeps serving. Seconds until a retry."""
        self._end(cutover)
        return self.version_failed(cutover.version, f"cutover to version {cutover.version} "
                                                    f"failed: {error}")

    def cutover_cancelled(self, cutover: Cutover) -> None:
        self._end(cutover)

    def _end(self, cutover: Cutover) -> None:
        if self.cutover is not cutover:
            raise IllegalTransition(f"{self.label}: that cutover is not in progress")
        self.cutover = None

    # -- what status shows ----------------------------------------------------------------
    def status(self, *, details: bool = True) -> dict[str, Any]:
        """The endpoint's state. ``details`` (the admin API): its runner processes, and
        the last error with the runner's output lines; else only its first line."""
        runner, cutover = self.runner, self.cutover
        pending = cutover.runner if cutover else None
        out: dict[str, Any] = {
            "name": self.spec.name,
            "alias": self.spec.alias,
            "state": self.state.value,
            "model_uri": redact(self.spec.model_uri),
            "follows_registry": self.target.follows,
            "version": self.version,
            "served_uri": redact(runner.model_uri) if runner else None,
            "pending_version": cutover.version if cutover else None,
            "pending_state": _name(cutover.phase) if cutover else None,
            "failed_version": self.failed_version,
            "last_error": self.last_error if details else summary(self.last_error),
            "retry_in": round(self.backing_off(), 1) if self.state is State.FAILED else None,
            "last_poll": self.last_poll,
            "last_poll_error": self.last_poll_error,
            "poll_failures": self.poll_failures,
            "batching": None if self.spec.batching is None else {
                "max_batch_size": self.spec.batching.max_batch_size,
                "max_wait_ms": round(self.spec.batching.max_wait * 1000, 3),
                "mean_batch_size": self.mean_batch_size},
            "shadow": self.shadow_stats,
            "rollout": cutover.rollout.describe() if cutover and cutover.rollout else None,
            "rolled_back": None if self.rolled_back is None else {
                "version": self.rolled_back[0], "reason": self.rolled_back[1]},
        }
        if details:
            out["runner"] = runner.describe() if runner else None
            out["pending_runner"] = pending.describe() if pending else None
        return out
