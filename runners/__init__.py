"""The process side: MLflow scoring-server runners and the pool that owns them.

Never imports ``gateway``: the HTTP side drives this package, not the other way round.
"""

from .endpoint import Endpoint
from .errors import PoolBusy, ResolveError, RunnerError, RunnerGone, RunnerStartError, StartBackoff
from .events import PoolEvents
from .pool import RunnerPool
from .registry import RegistryClient, Resolved
from .runner import Runner
from .spec import ENV_MANAGERS, LAUNCHERS, EndpointSpec, PoolSpec
from .target import ModelTarget
from .watcher import VersionWatcher

__all__ = [
    "ENV_MANAGERS", "LAUNCHERS", "Endpoint", "EndpointSpec", "ModelTarget", "PoolBusy",
    "PoolEvents", "PoolSpec", "RegistryClient", "ResolveError", "Resolved", "Runner",
    "RunnerError", "RunnerGone", "RunnerPool", "RunnerStartError", "StartBackoff",
    "VersionWatcher",
]
