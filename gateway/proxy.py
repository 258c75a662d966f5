"""The streaming reverse proxy for ``/models/<name>/<alias>/<action>``.

A plain ASGI callable rather than a Starlette route: it is on every prediction's path,
so it parses the path once, checks the caller and the request's size, binds the request
to a runner, and moves bytes (``upstream.py`` holds the connections to runners).

The server protocol serves most proxied requests without calling it (``direct.py``), with
the checks of ``admit()`` and the bookkeeping of ``record()``; a request that needs more
than that continues in ``relay()``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import AsyncIterator
from urllib.parse import unquote

import aiohttp

from runners import Endpoint, Runner, RunnerPool

from .access import AccessLog
from .auth import InferencePolicy
from .errors import map_error, send_error
from .metrics import GatewayMetrics
from .types import ASGIApp, Receive, Scope, Send
from .upstream import SMALL_BODY, IncomingRequest, UpstreamConnection, UpstreamPool

access_logger = logging.getLogger("model_gateway.access")

PROXIED = {"invocations": "POST", "ping": "GET", "health": "GET", "version": "GET"}
UNAUTHORIZED = [(b"www-authenticate", b'Bearer realm="model-gateway"')]


def parse_route(raw_path: bytes) -> tuple[str, str, str] | None:
    """``/models/<name>/<alias>/<action>`` → decoded (name, alias, action), else None."""
    parts = raw_path.split(b"?", 1)[0].split(b"/")
    if len(parts) != 5 or parts[1] != b"models" or not all(parts[2:]):
        return None
    return unquote(parts[2].decode("latin-1")), unquote(parts[3].decode("latin-1")), \
        parts[4].decode("latin-1")


class ModelProxy:
    """Serves proxied model routes itself and hands every other request to ``app``.

    ``policy``, ``max_body_size`` and ``max_header_size`` may be replaced while serving
    (config reload); each request reads them once.
    """

    def __init__(self, app: ASGIApp, pool: RunnerPool, metrics: GatewayMetrics) -> None:
        self.app = app
        self.pool = pool
        self.metrics = metrics
        self.policy = InferencePolicy([], [])
        self.max_body_size = 64 * 2**20
        self.max_header_size = 64 * 2**10
        self._upstreams: weakref.WeakKeyDictionary[Runner, UpstreamPool] = \
            weakref.WeakKeyDictionary()
        self.access_log = AccessLog(access_logger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = parse_route(scope.get("raw_path") or scope["path"].encode())
            if route is not None and route[2] in PROXIED:
                await self.proxy(scope, receive, send, *route)
                return
        await self.app(scope, receive, send)

    def admit(self, scope: Scope, name: str, alias: str, action: str
              ) -> tuple[Endpoint, IncomingRequest] | None:
        """The endpoint and request when ``scope`` may be served without the ASGI cycle
        (``direct.py``): declared, not refused, and a body that is absent or small enough
        to send in one piece. Anything else takes ``proxy()``, which answers it."""
        ep = self.pool.endpoints.get((name, alias))
        if ep is None:
            return None
        request = IncomingRequest(scope, action)
        length = request.content_length
        if (length is None and request.method in ("POST", "PUT")) or \
                (length is not None and length > SMALL_BODY) or \
                self._refusal(request, ep.key, action) is not None:
            return None
        return ep, request

    def _refusal(self, request: IncomingRequest, key: tuple[str, str], action: str
                 ) -> tuple[int, str, str, list[tuple[bytes, bytes]]] | None:
        """Why this request is refused before it reaches a runner, or None."""
        method = request.method
        if method != PROXIED[action] and not (action != "invocations" and method == "HEAD"):
            return 405, "method_not_allowed", f"{action} accepts {PROXIED[action]} only", \
                [(b"allow", PROXIED[action].encode())]
        if request.header_bytes > self.max_header_size:
            return 431, "headers_too_large", \
                f"request headers exceed max_header_size ({self.max_header_size} bytes)", []
        if not self.policy.allows(key, request.authorization):
            return 401, "unauthorized", "a valid api key is required", UNAUTHORIZED
        if request.content_length is not None and request.content_length > self.max_body_size:
            return 413, "body_too_large", \
                f"request body exceeds max_body_size ({self.max_body_size} bytes)", []
        return None

    async def proxy(self, scope: Scope, receive: Receive, send: Send,
                    name: str, alias: str, action: str) -> None:
        ep = self.pool.endpoints.get((name, alias))
        if ep is None:
            await send_error(send, 404, "endpoint_not_found",
                             "no endpoint is declared with that name and alias")
            return
        request = IncomingRequest(scope, action)
        started = time.perf_counter()
        request_id = (b"x-request-id", request.request_id)
        refusal = self._refusal(request, ep.key, action)
        if refusal is not None:
            status, code, message, extra = refusal
            await send_error(send, status, code, message, [*extra, request_id])
            self.record(scope, ep, None, status, started, request.request_id)
            return
        status = 500
        try:
            runner = await self.pool.acquire(ep)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            status, code, message, extra = map_error(exc, ep.spec.label)
            await send_error(send, status, code, message, [*extra, request_id])
            self.record(scope, ep, None, status, started, request.request_id)
            return
        try:
            status = await self._forward(request, receive, send, ep, runner)
        except BodyTooLarge:
            status = 413
            await send_error(send, status, "body_too_large",
                             f"request body exceeds max_body_size ({self.max_body_size} bytes)",
                             [request_id])
        except ClientDisconnected:
            status = 499  # nobody is left to answer
        finally:
            self.pool.release(ep, runner)
            self.record(scope, ep, runner, status, started, request.request_id)

    def close(self) -> None:
        """Close every idle connection to the runners (they also close when a runner exits)."""
        for upstream in list(self._upstreams.values()):
            upstream.close()

    def upstream(self, runner: Runner) -> UpstreamPool:
        upstream = self._upstreams.get(runner)
        if upstream is None:
            upstream = self._upstreams[runner] = UpstreamPool("127.0.0.1", runner.port, [
                (b"x-model-version", (runner.version or "-").encode()),
                (b"x-model-uri", runner.model_uri.encode())], unix=runner.socket)
        return upstream

    async def _forward(self, request: IncomingRequest, receive: Receive, send: Send,
                       ep: Endpoint, runner: Runner) -> int:
        body: bytes | AsyncIterator[bytes]
        length = request.content_length
        if length is not None and length <= SMALL_BODY:
            body = await _read_body(receive)
        elif request.method in ("POST", "PUT"):
            body = _stream_body(receive, self.max_body_size)
        else:
            body = b""
        deadline = time.monotonic() + ep.spec.request_timeout
        return await self.relay(request, body, send, ep, runner, deadline)

    async def relay(self, request: IncomingRequest, body: bytes | AsyncIterator[bytes],
                    send: Send, ep: Endpoint, runner: Runner, deadline: float,
                    sent: UpstreamConnection | None = None) -> int:
        """Send the request to ``runner`` (unless it was ``sent`` already) and its answer
        to the caller; the answer's status, or the error status the caller was sent."""
        upstream = self.upstream(runner)
        request_id = (b"x-request-id", request.request_id)
        try:
            conn = await upstream.exchange(request, body, deadline, sent=sent)
        except (TimeoutError, aiohttp.ClientError) as exc:
            if isinstance(exc, TimeoutError) and runner.exited.is_set():
                exc = aiohttp.ServerDisconnectedError()
            status, code, message, extra = map_error(exc, ep.spec.label)
            await send_error(send, status, code, message,
                             [*extra, request_id, upstream.answer_headers[0]])
            return status
        done = False
        try:
            start = {"type": "http.response.start", "status": conn.status,
                     "headers": [*conn.headers, *upstream.answer_headers, request_id]}
            if conn.complete:  # the whole answer is in: send it in one piece
                await send(start)
                await send({"type": "http.response.body", "body": conn.take_body()})
            else:  # the status line is out; a failure now can only cut the answer short
                await send(start)
                async for chunk in conn.iter_body(ep.spec.request_timeout):
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            done = True
            return conn.status
        finally:
            upstream.finish(conn, reuse=done)

    def record(self, scope: Scope, ep: Endpoint, runner: Runner | None, status: int,
               started: float, request_id: bytes) -> None:
        """Count the request and write its access line."""
        seconds = time.perf_counter() - started
        self.metrics.observe_request(ep.spec.name, ep.spec.alias, status, seconds)
        if self.access_log.enabled():
            self.access_log.add((scope["method"], scope["path"], status), {
                "method": scope["method"], "route": scope["path"],
                "endpoint": ep.spec.label, "version": runner.version if runner else None,
                "status": status, "duration_ms": round(seconds * 1000, 2),
                "request_id": request_id.decode("latin-1")})


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body  # the usual case: the whole body in one message
    chunks = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _stream_body(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives; past ``limit`` bytes, BodyTooLarge (no buffering)."""
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge()
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return


class ClientDisconnected(Exception):
    """The caller went away before its request body arrived."""


class BodyTooLarge(Exception):
    """A request body without Content-Length grew past max_body_size."""
