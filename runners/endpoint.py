"""Endpoint: one declared name/alias, the runner serving it, and what happened to it."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from .runner import Runner
from .spec import EndpointSpec
from .target import ModelTarget

COLD, STARTING, READY, FAILED, STOPPING = "cold", "starting", "ready", "failed", "stopping"
BUILDING_ENV = "building_env"  # a cold start building the model's environment first
BACKOFF_BASE, BACKOFF_CAP = 1.0, 60.0


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(uri: str | None) -> str | None:
    """A URI without credentials (``https://user:token@host`` → ``https://***@host``)."""
    return _USERINFO.sub("***@", uri) if uri else uri


def backoff(failures: int) -> float:
    """1 s, 2 s, 4 s … capped at a minute: a failing start is never retried at full speed."""
    return min(BACKOFF_BASE * 2 ** max(failures - 1, 0), BACKOFF_CAP)


class Endpoint:
    """Runtime state of one endpoint. The pool mutates it; the gateway only reads it."""

    def __init__(self, spec: EndpointSpec) -> None:
        self.spec = spec
        self.target = ModelTarget.parse(spec.model_uri)
        self.slots = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
        self.state = COLD
        self.runner: Runner | None = None  # serving (blue)
        self.pending: Runner | None = None  # starting beside it during a cutover (green)
        self.pending_version: str | None = None
        self.pending_state: str | None = None  # building_env / starting, during a cutover
        self.version: str | None = None
        self.last_error: str | None = None
        self.failed_version: str | None = None
        self.start_task: asyncio.Task[Runner] | None = None
        self.start_failures = 0
        self.retry_at = 0.0
        self.cutover_failures = 0
        self.cutover_retry_at = 0.0
        self.refresh_task: asyncio.Task[None] | None = None
        self.next_poll = 0.0
        self.last_poll: float | None = None
        self.last_poll_error: str | None = None
        self.poll_failures = 0
        self.last_memory = 0  # bytes its last runner used: the estimate for its next start
        self.last_output: list[str] = []  # the last runner's output, kept after it exited

    def use_spec(self, spec: EndpointSpec) -> None:
        """Adopt a changed spec (config reload); runners started from now on use it."""
        self.spec = spec
        self.target = ModelTarget.parse(spec.model_uri)
        self.slots = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
        self.start_failures, self.retry_at = 0, 0.0
        self.failed_version, self.cutover_failures, self.cutover_retry_at = None, 0, 0.0

    @property
    def key(self) -> tuple[str, str]:
        return self.spec.key

    def status(self) -> dict[str, Any]:
        runner = self.runner
        return {
            "name": self.spec.name,
            "alias": self.spec.alias,
            "state": self.state,
            "model_uri": redact(self.spec.model_uri),
            "follows_registry": self.target.follows,
            "version": self.version,
            "served_uri": redact(runner.model_uri) if runner else None,
            "runner": runner.describe() if runner else None,
            "pending_version": self.pending_version,
            "pending_state": self.pending_state if self.pending_version else None,
            "pending_runner": self.pending.describe() if self.pending else None,
            "last_error": self.last_error,
            "failed_version": self.failed_version,
            "retry_in": max(0.0, round(self.retry_at - time.monotonic(), 1))
            if self.state == FAILED else None,
            "last_poll": self.last_poll,
            "last_poll_error": self.last_poll_error,
            "poll_failures": self.poll_failures,
        }
