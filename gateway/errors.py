"""JSON error answers, and the one place where failures become HTTP statuses.

    RunnerStartError / StartBackoff  → 503 + Retry-After (the runner's last lines)
    PoolBusy                         → 503 + Retry-After
    timeout waiting for the runner   → 504
    connection refused / reset       → 502
"""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp

from runners import PoolBusy, RunnerError, RunnerStartError

from .types import Send


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def send_error(send: Send, status: int, code: str, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_body(code, message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def map_error(exc: BaseException, label: str) -> tuple[int, str, str, list[tuple[bytes, bytes]]]:
    """(status, code, message, extra headers) for a failure while serving ``label``."""
    if isinstance(exc, (RunnerStartError, PoolBusy)):
        retry = str(max(1, math.ceil(exc.retry_after))).encode()
        code = "runner_unavailable" if isinstance(exc, RunnerStartError) else "pool_busy"
        return 503, code, f"{label}: {exc}", [(b"retry-after", retry)]
    if isinstance(exc, RunnerError):
        return 502, "runner_error", f"{label}: {exc}", []
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return 504, "runner_timeout", f"{label}: the runner did not answer in time", []
    if isinstance(exc, aiohttp.ClientError):
        reason = type(exc).__name__
        return 502, "runner_unreachable", f"{label}: the runner is unreachable ({reason})", []
    return 500, "internal_error", f"{label}: internal error ({type(exc).__name__})", []
