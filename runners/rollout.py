"""Rollout: a new version earns its traffic step by step, judged against the old one.

When an endpoint with a ``rollout`` spec cuts over, its green runner does not take all
traffic once warm. It takes each step's share (``steps``, percent) for at least
``step_time`` and at least ``min_requests`` of its own; blue serves the rest. A step is
judged on what callers got from each version at that step:

- **errors**: the share of the new version's answers that failed server-side (5xx,
  unreachable, timeout; a 4xx is the caller's doing). A failure count that already puts
  the rate over ``max_error_rate`` at ``min_requests`` rolls back at once: waiting for
  the rest of the sample could not change the verdict, only add failed callers.
- **latency**: the new version's p95 over the old version's at the same step (or, at a
  step where the old one had too few requests, at the last step where it had enough).

Crossing a bound rolls back: all traffic returns to blue, green is stopped, and the
version is not tried again until the alias moves on (or an operator retries it).
Passing the last step promotes: green serves alone, as after an immediate cutover.

Which version a request reaches: the golden-ratio sequence gives the exact share; with
``sticky``, a header value's fixed point does, so a caller stays on one version within a
step, and once on the new version stays there as its share grows.

This object only counts and judges; the watcher moves runners on its verdict.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .spec import RolloutSpec
from .spread import Spread, sticky_point

SAMPLES = 10_000  # latencies kept per version and step (the latest)


class Tally:
    """One version's answers at one step."""

    __slots__ = ("errors", "latencies", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=SAMPLES)  # of answers that did not fail

    def add(self, failed: bool, seconds: float) -> None:
        self.requests += 1
        if failed:
            self.errors += 1
        else:
            self.latencies.append(seconds)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def p95(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank

    def describe(self) -> dict[str, Any]:
        p95 = self.p95()
        rate = self.error_rate
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": None if rate is None else round(rate, 4),
                "p95_ms": None if p95 is None else round(p95 * 1000, 2)}


@dataclass(frozen=True)
class Verdict:
    promoted: bool  # False: rolled back
    reason: str


def failed(status: int | None) -> bool:
    """Whether an answer counts against the version: 5xx, or no answer (None)."""
    return status is None or status >= 500


class Rollout:
    def __init__(self, spec: RolloutSpec, version: str | None, old_version: str | None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.version, self.old_version = version, old_version
        self.clock = clock
        self.began = self.step_began = clock()
        self.step = 0  # index into spec.steps
        self.new, self.old = Tally(), Tally()
        self.reference: Tally | None = None  # the old version's latest sizeable step
        self.verdict: Verdict | None = None
        self.decided = asyncio.Event()
        self._spread = Spread()
        self._sticky = spec.sticky.lower().encode() if spec.sticky else None

    @property
    def share(self) -> float:
        """Percent of traffic on the new version now (0 once rolled back)."""
        if self.verdict is not None:
            return 100.0 if self.verdict.promoted else 0.0
        return self.spec.steps[self.step]

    def routes_new(self, headers: list[tuple[bytes, bytes]] | None) -> bool:
        """Whether a request with these (lower-case) headers goes to the new version."""
        share = self.share / 100
        if self._sticky is not None and headers:
            for name, value in headers:
                if name == self._sticky:
                    return sticky_point(value) < share
        return self._spread.sampled(share)

    # -- counting -------------------------------------------------------------------------
    def observe(self, new: bool, status: int | None, seconds: float) -> None:
        """One caller's answer from the new (``new``) or the old version."""
        if self.verdict is not None:
            return
        bad = failed(status)
        (self.new if new else self.old).add(bad, seconds)
        tally = self.new
        if new and bad and tally.errors / max(tally.requests, self.spec.min_requests) \
                > self.spec.max_error_rate:
            self._decide(False, self._error_reason())

    # -- judging --------------------------------------------------------------------------
    def judge(self) -> None:
        """Judge the step so far; move to the next step when this one has passed."""
        if self.verdict is not None:
            return
        spec, tally = self.spec, self.new
        if tally.requests < spec.min_requests:
            return  # not enough to judge, nor to pass the step
        if (tally.error_rate or 0.0) > spec.max_error_rate:
            self._decide(False, self._error_reason())
            return
        ratio = self.latency_ratio()
        if ratio is not None and ratio > spec.max_latency_ratio:
            ref = self._reference()
            assert ref is not None
            self._decide(False, f"p95 latency {_ms(tally.p95())} is {ratio:.2f}× the old "
                                f"version's {_ms(ref.p95())} at step {self._step_label()} "
                                f"(max_latency_ratio {spec.max_latency_ratio:g})")
            return
        if self.clock() - self.step_began < spec.step_time:
            return
        if self.step == len(spec.steps) - 1:
            self._decide(True, f"passed all {len(spec.steps)} steps")
            return
        if self.old.requests >= spec.min_requests:
            self.reference = self.old
        self.step += 1
        self.step_began = self.clock()
        self.new, self.old = Tally(), Tally()

    def latency_ratio(self) -> float | None:
        """The new version's p95 over the old one's, when both are known."""
        ref = self._reference()
        new_p95 = self.new.p95()
        old_p95 = ref.p95() if ref is not None else None
        if new_p95 is None or not old_p95:
            return None
        return new_p95 / old_p95

    def _reference(self) -> Tally | None:
        return self.old if self.old.requests >= self.spec.min_requests else self.reference

    def promote(self, reason: str) -> None:
        self._decide(True, reason)

    def roll_back(self, reason: str) -> None:
        self._decide(False, reason)

    def _decide(self, promoted: bool, reason: str) -> None:
        if self.verdict is None:
            self.verdict = Verdict(promoted, reason)
            self.decided.set()

    def _error_reason(self) -> str:
        t, spec = self.new, self.spec
        return (f"{t.errors} of {t.requests} requests failed at step {self._step_label()}: "
                f"more than max_error_rate {spec.max_error_rate:.2%} of "
                f"{max(t.requests, spec.min_requests)}")

    def _step_label(self) -> str:
        return f"{self.step + 1} ({self.spec.steps[self.step]:g}%)"

    # -- what status shows ----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        now, spec = self.clock(), self.spec
        ratio = self.latency_ratio()
        return {
            "version": self.version, "old_version": self.old_version,
            "step": self.step + 1, "steps": list(spec.steps), "share": self.share,
            "step_seconds": round(now - self.step_began, 1),
            "step_time": spec.step_time, "min_requests": spec.min_requests,
            "max_error_rate": spec.max_error_rate,
            "max_latency_ratio": spec.max_latency_ratio,
            "sticky": spec.sticky,
            "new": self.new.describe(), "old": self.old.describe(),
            "latency_ratio": None if ratio is None else round(ratio, 3),
            "seconds": round(now - self.began, 1),
            "verdict": None if self.verdict is None else
            ("promoted" if self.verdict.promoted else "rolled_back"),
            "reason": None if self.verdict is None else self.verdict.reason,
        }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"
