"""Errors raised by the process side.

    RunnerError
    ├── RunnerStartError      the runner did not become ready (exit, timeout, bad model)
    │   └── StartBackoff      a recent start failed; not retried until the backoff passes
    ├── RunnerGone            the runner exited while a request was bound to it
    ├── PoolBusy              no runner slot freed up within queue_timeout
    └── ResolveError          the registry could not resolve the model URI
"""

from __future__ import annotations


class RunnerError(Exception):
    """Base class for every error of the process side."""


class RunnerStartError(RunnerError):
    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StartBackoff(RunnerStartError):
    pass


class RunnerGone(RunnerError):
    pass


class PoolBusy(RunnerError):
    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ResolveError(RunnerError):
    pass
