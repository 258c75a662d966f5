"""The process side: MLflow scoring-server runners and the pool that owns them.

Never imports ``gateway``: the HTTP side drives this package, not the other way round.
"""

from .client import OutgoingRequest, Response, RunnerClient
from .connection import RunnerConnection
from .endpoint import Cutover, Endpoint, IllegalTransition, Phase, State
from .errors import (
    ConnectError,
    HelperUnavailable,
    PoolBusy,
    ReadTimeout,
    RemoteProtocolError,
    ResolveError,
    RunnerError,
    RunnerStartError,
    ServerDisconnected,
    StartBackoff,
    TransportError,
)
from .events import EventFanout, PoolEvents
from .launch import Fork, LaunchSpec
from .pool import RunnerPool
from .registry import Resolved
from .rollout import Rollout
from .runner import Runner
from .spec import BatchingSpec, EndpointSpec, PoolSpec, RolloutSpec
from .watcher import VersionWatcher

__all__ = [
    "BatchingSpec",
    "ConnectError",
    "Cutover",
    "Endpoint",
    "EndpointSpec",
    "EventFanout",
    "Fork",
    "HelperUnavailable",
    "IllegalTransition",
    "LaunchSpec",
    "OutgoingRequest",
    "Phase",
    "PoolBusy",
    "PoolEvents",
    "PoolSpec",
    "ReadTimeout",
    "RemoteProtocolError",
    "ResolveError",
    "Resolved",
    "Response",
    "Rollout",
    "RolloutSpec",
    "Runner",
    "RunnerClient",
    "RunnerConnection",
    "RunnerError",
    "RunnerPool",
    "RunnerStartError",
    "ServerDisconnected",
    "StartBackoff",
    "State",
    "TransportError",
    "VersionWatcher",
]
