"""What the process side needs to know about an endpoint; built by the gateway's config."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class BatchingSpec:
    """Requests the gateway merges into one predict call; the runner never sees it."""

    max_batch_size: int = 64
    max_wait: float = 0.0  # seconds the first request of a batch waits for companions


@dataclass(frozen=True)
class RolloutSpec:
    """A new version earns its traffic in steps, and is rolled back when it does worse."""

    steps: tuple[float, ...] = (10.0, 50.0, 100.0)  # percent of traffic, ascending
    step_time: float = 120.0  # seconds at each step (at least; see min_requests)
    max_error_rate: float = 0.01  # fraction of its requests failing server-side
    max_latency_ratio: float = 2.0  # its p95 over the old version's
    min_requests: int = 50  # per step, before the step is judged or passed
    sticky: str | None = None  # a header: a caller with one value stays on one version


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    alias: str
    model_uri: str
    env_manager: str = "local"
    launcher: str = "fork"
    workers: int = 1
    startup_timeout: float = 300.0
    request_timeout: float = 60.0
    poll_interval: float = 30.0
    drain_timeout: float = 30.0
    max_concurrency: int = 0  # 0: unlimited
    preload: bool = False
    pinned: bool = False
    nice: int = 0  # its runners' CPU priority below the gateway's (0–19)
    batching: BatchingSpec | None = None
    rollout: RolloutSpec | None = None  # None: a new version takes all traffic at once

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.alias)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.alias}"

    def runs_like(self, other: EndpointSpec) -> bool:
        """Whether ``other`` needs the same runner: they differ in batching or rollout at
        most."""
        return replace(self, batching=other.batching, rollout=other.rollout) == other


@dataclass(frozen=True)
class PoolSpec:
    max_runners: int = 8
    idle_timeout: float = 600.0  # 0 disables idle eviction
    queue_timeout: float = 30.0
    memory_limit: int = 0  # bytes for all runners together; 0 disables the budget
    health_interval: float = 10.0  # seconds between /ping checks of idle runners
    # A new runner is not evicted for a start before it served this long; None: as long
    # as it took to start (a start is only worth it if the runner then serves for as long).
    min_residency: float | None = None
    runner_tcp: bool = False  # runners listen on TCP too (cli runners always do)
    tracking_uri: str | None = None
    registry_uri: str | None = None
    env_cache_dir: str | None = None  # None: environment.default_cache_dir()
    state_dir: str | None = None  # where rollouts are journalled, to survive a restart
