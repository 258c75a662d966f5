"""The streaming reverse proxy for ``/models/<name>/<alias>/<action>``.

A plain ASGI callable rather than a Starlette route: it is on every prediction's path,
so it parses the path once, binds the request to a runner, and moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import unquote

import aiohttp

from runners import Endpoint, Runner, RunnerPool

from .errors import map_error, send_error
from .types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("model_gateway.proxy")

PROXIED = {"invocations": "POST", "ping": "GET", "health": "GET", "version": "GET"}
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"trailers",
                        b"transfer-encoding", b"upgrade", b"host"})
# The gateway's own server adds these; the runner's copies would be duplicates.
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}
SMALL_BODY = 256 * 1024  # bodies up to this size are sent in one piece, larger ones stream


def parse_route(raw_path: bytes) -> tuple[str, str, str] | None:
    """``/models/<name>/<alias>/<action>`` → decoded (name, alias, action), else None."""
    parts = raw_path.split(b"?", 1)[0].split(b"/")
    if len(parts) != 5 or parts[1] != b"models" or not all(parts[2:]):
        return None
    return unquote(parts[2].decode("latin-1")), unquote(parts[3].decode("latin-1")), \
        parts[4].decode("latin-1")


class ModelProxy:
    """Serves proxied model routes itself and hands every other request to ``app``."""

    def __init__(self, app: ASGIApp, pool: RunnerPool) -> None:
        self.app = app
        self.pool = pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = parse_route(scope.get("raw_path") or scope["path"].encode())
            if route is not None and route[2] in PROXIED:
                await self.proxy(scope, receive, send, *route)
                return
        await self.app(scope, receive, send)

    async def proxy(self, scope: Scope, receive: Receive, send: Send,
                    name: str, alias: str, action: str) -> None:
        ep = self.pool.endpoints.get((name, alias))
        if ep is None:
            await send_error(send, 404, "endpoint_not_found",
                             "no endpoint is declared with that name and alias")
            return
        if scope["method"] != PROXIED[action] and not (action != "invocations"
                                                       and scope["method"] == "HEAD"):
            await send_error(send, 405, "method_not_allowed",
                             f"{action} accepts {PROXIED[action]} only",
                             [(b"allow", PROXIED[action].encode())])
            return
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        started = time.perf_counter()
        status = 500
        try:
            runner = await self.pool.acquire(ep)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            status, code, message, extra = map_error(exc, ep.spec.label)
            await send_error(send, status, code, message,
                             [*extra, (b"x-request-id", request_id.encode())])
            self._access(scope, ep, None, status, started, request_id)
            return
        try:
            status = await self._forward(scope, receive, send, ep, runner, action, request_id)
        except ClientDisconnected:
            status = 499  # nobody is left to answer
        finally:
            self.pool.release(ep, runner)
            self._access(scope, ep, runner, status, started, request_id)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, ep: Endpoint,
                       runner: Runner, action: str, request_id: str) -> int:
        assert runner.session is not None
        headers = _upstream_headers(scope, request_id)
        length = _header(scope, b"content-length")
        body: bytes | AsyncIterator[bytes]
        if length is not None and length.isdigit() and int(length) <= SMALL_BODY:
            body = await _read_body(receive)
        elif scope["method"] in ("POST", "PUT"):
            body = _stream_body(receive)
        else:
            body = b""
        query = scope.get("query_string") or b""
        url = f"{runner.base_url}/{action}" + (f"?{query.decode('latin-1')}" if query else "")
        version = (runner.version or "-").encode()
        timeout = aiohttp.ClientTimeout(total=None, sock_read=ep.spec.request_timeout)
        started = False
        try:
            async with asyncio.timeout(ep.spec.request_timeout):
                resp = await runner.session.request(scope["method"], url, data=body,
                                                    headers=headers, timeout=timeout)
            async with resp:
                out = [(k.lower(), v) for k, v in resp.raw_headers
                       if k.lower() not in RESPONSE_DROP]
                out += [(b"x-model-version", version),
                        (b"x-model-uri", runner.model_uri.encode()),
                        (b"x-request-id", request_id.encode())]
                if resp.content_length is not None and resp.content_length <= SMALL_BODY:
                    payload = await resp.read()
                    started = True
                    await send({"type": "http.response.start", "status": resp.status,
                                "headers": out})
                    await send({"type": "http.response.body", "body": payload})
                    return resp.status
                started = True
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            if started:  # the status line is out; all we can do is cut the response short
                raise
            if isinstance(exc, asyncio.TimeoutError) and runner.exited.is_set():
                exc = aiohttp.ServerDisconnectedError()
            status, code, message, extra = map_error(exc, ep.spec.label)
            await send_error(send, status, code, message,
                             [*extra, (b"x-request-id", request_id.encode()),
                              (b"x-model-version", version)])
            return status

    def _access(self, scope: Scope, ep: Endpoint, runner: Runner | None, status: int,
                started: float, request_id: str) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %s", scope["method"], scope["path"], status, extra={
                "endpoint": ep.spec.label, "version": runner.version if runner else None,
                "status": status, "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                "request_id": request_id})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _upstream_headers(scope: Scope, request_id: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    forwarded = None
    for key, value in scope["headers"]:
        if key in HOP_BY_HOP:
            continue
        if key == b"x-forwarded-for":
            forwarded = value.decode("latin-1")
            continue
        headers[key.decode("latin-1")] = value.decode("latin-1")
    client = scope.get("client")
    if client:
        forwarded = f"{forwarded}, {client[0]}" if forwarded else client[0]
    if forwarded:
        headers["x-forwarded-for"] = forwarded
    headers["x-request-id"] = request_id
    return headers


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _stream_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return


class ClientDisconnected(Exception):
    """The caller went away before its request body arrived."""
