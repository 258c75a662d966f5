"""Errors raised by the process side.

    RunnerError
    ├── RunnerStartError        the runner did not become ready (exit, timeout, bad model)
    │   ├── StartBackoff        a recent start failed; not retried until the backoff passes
    │   ├── EnvBuildError       the model's environment (or download) could not be prepared
    │   └── HelperUnavailable   a helper process (zygote, resolver) is down and restarting
    ├── PoolBusy                no runner slot freed up within queue_timeout
    ├── ResolveError            the registry could not resolve the model URI
    └── TransportError          talking HTTP to a runner failed (``runners.client``)
        ├── ConnectError        no connection could be made (refused, no such socket)
        ├── ServerDisconnected  the runner closed the connection before a complete answer
        ├── RemoteProtocolError the runner's answer was not valid HTTP/1.1
        └── ReadTimeout         no complete answer before the deadline

The gateway maps these to HTTP statuses in one place (``gateway.errors.map_error``).
"""

from __future__ import annotations


def summary(text: str | None) -> str | None:
    """The first line of a failure's message: what a caller may be told. The lines after
    it (a runner's output: tracebacks, file paths) are for the admin API and the log."""
    return text.split("\n", 1)[0] if text else text


class RunnerError(Exception):
    """Base class for every error of the process side."""


class RunnerStartError(RunnerError):
    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StartBackoff(RunnerStartError):
    pass


class EnvBuildError(RunnerStartError):
    """A model's environment (or its download) could not be prepared; the message says why."""


class PoolBusy(RunnerError):
    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ResolveError(RunnerError):
    pass


class HelperUnavailable(RunnerStartError):
    """A helper process is down; the supervisor restarts it after ``retry_after`` seconds."""


class TransportError(RunnerError):
    pass


class ConnectError(TransportError):
    pass


class ServerDisconnected(TransportError):
    pass


class RemoteProtocolError(TransportError):
    pass


class ReadTimeout(TransportError):
    pass
