"""The gateway's one error shape, and the one place where failures become HTTP statuses.

Every error the gateway itself answers is ``{"error": {"code": …, "message": …}}``.

    RunnerStartError / StartBackoff / HelperUnavailable → 503 runner_unavailable + Retry-After
    PoolBusy                                            → 503 pool_busy + Retry-After
    ReadTimeout                                         → 504 runner_timeout
    ConnectError / ServerDisconnected /
    RemoteProtocolError                                 → 502 runner_unreachable
"""

from __future__ import annotations

import json
import math

from starlette.responses import JSONResponse

from runners import PoolBusy, ReadTimeout, RunnerError, RunnerStartError, TransportError
from runners.errors import summary

from .types import Send

Refusal = tuple[int, str, str, list[tuple[bytes, bytes]]]  # status, code, message, headers


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None
               ) -> JSONResponse:
    """The error shape as a Starlette response, for routes."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def not_declared() -> JSONResponse:
    # Never echo the path back: the caller learns only that no such endpoint exists.
    return json_error(404, "endpoint_not_found", "no endpoint is declared with that name and alias")


async def send_error(send: Send, status: int, code: str, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """The error shape as ASGI messages, for the proxy."""
    body = error_body(code, message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def map_error(exc: BaseException, label: str) -> Refusal:
    """(status, code, message, extra headers) for a failure while serving ``label``."""
    if isinstance(exc, (RunnerStartError, PoolBusy)):
        retry = str(max(1, math.ceil(exc.retry_after))).encode()
        code = "pool_busy" if isinstance(exc, PoolBusy) else "runner_unavailable"
        return 503, code, f"{label}: {summary(str(exc))}", [(b"retry-after", retry)]
    if isinstance(exc, ReadTimeout):
        return 504, "runner_timeout", f"{label}: the runner did not answer in time", []
    if isinstance(exc, TransportError):
        reason = type(exc).__name__
        return 502, "runner_unreachable", f"{label}: the runner is unreachable ({reason})", []
    if isinstance(exc, RunnerError):
        return 502, "runner_error", f"{label}: {exc}", []
    return 500, "internal_error", f"{label}: internal error ({type(exc).__name__})", []
