"""PoolEvents: what the pool reports as it works. The gateway turns these into metrics.

The base class ignores every event, so the pool runs the same with or without an
observer; ``runners`` never imports the gateway's metrics.
"""

from __future__ import annotations

from .endpoint import Endpoint


class PoolEvents:
    def cold_start(self, ep: Endpoint, seconds: float, ok: bool) -> None:
        """A cold start finished (``ok``) or failed after ``seconds``."""

    def cutover(self, ep: Endpoint, ok: bool) -> None:
        """A blue-green cutover switched traffic (``ok``) or gave up on the new version."""

    def rolled_back(self, ep: Endpoint) -> None:
        """A rollout's new version did worse than the old one (``ep.rolled_back``) and
        was taken out of service."""

    def eviction(self, ep: Endpoint, reason: str) -> None:
        """A runner was stopped to save resources: ``idle``, ``capacity`` or ``memory``."""

    def restart(self, ep: Endpoint) -> None:
        """A runner exited or hung unexpectedly; the next request starts a new one."""

    def poll_failure(self, ep: Endpoint) -> None:
        """Re-resolving the endpoint's alias or stage in the registry failed."""


class EventFanout(PoolEvents):
    """Passes every event on to each observer in turn (the metrics, the status history)."""

    def __init__(self, *observers: PoolEvents) -> None:
        self.observers = observers

    def cold_start(self, ep: Endpoint, seconds: float, ok: bool) -> None:
        for o in self.observers:
            o.cold_start(ep, seconds, ok)

    def cutover(self, ep: Endpoint, ok: bool) -> None:
        for o in self.observers:
            o.cutover(ep, ok)

    def rolled_back(self, ep: Endpoint) -> None:
        for o in self.observers:
            o.rolled_back(ep)

    def eviction(self, ep: Endpoint, reason: str) -> None:
        for o in self.observers:
            o.eviction(ep, reason)

    def restart(self, ep: Endpoint) -> None:
        for o in self.observers:
            o.restart(ep)

    def poll_failure(self, ep: Endpoint) -> None:
        for o in self.observers:
            o.poll_failure(ep)
