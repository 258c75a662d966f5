"""A proxied request: its route, the head the runner is sent, and its body.

``/models/<name>/<alias>/<action>`` routes are parsed once; :class:`IncomingRequest`
reads the caller's headers once, keeping what the proxy checks (authorization, length,
header bytes) and building the head for the runner (``runners.client`` adds Host and the
framing headers). :func:`read_body` reads a small body whole and streams a large one.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import AsyncIterator
from urllib.parse import unquote

from .types import Receive, Scope

SMALL_BODY = 256 * 1024  # request bodies up to this size are read whole, larger ones stream

ROUTE = "model_gateway.route"  # scope key: the routing endpoint a request came through

# The proxied actions and the method each accepts (HEAD also, except on invocations).
PROXIED = {"invocations": "POST", "ping": "GET", "health": "GET", "version": "GET"}
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"trailers",
                        b"transfer-encoding", b"upgrade", b"host"})
# The gateway sets these itself on the way to the runner.
REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"expect", b"x-forwarded-for",
                             b"x-request-id", b"authorization"}

_ids = random.Random()  # request ids need to be unique, not secret: no syscall per request
# A caller's request id is kept when it is short and plain (UUIDs, trace ids, base64): it
# is echoed in answers and written to logs. Anything else gets a new one.
SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,128}")


def parse_route(raw_path: bytes, prefix: bytes = b"") -> tuple[str, str, str] | None:
    """``<prefix>/models/<name>/<alias>/<action>`` → decoded (name, alias, action), else
    None."""
    if prefix:
        if not raw_path.startswith(prefix + b"/"):
            return None
        raw_path = raw_path[len(prefix):]
    parts = raw_path.split(b"?", 1)[0].split(b"/")
    if len(parts) != 5 or parts[1] != b"models" or not all(parts[2:]):
        return None
    return unquote(parts[2].decode("latin-1")), unquote(parts[3].decode("latin-1")), \
        parts[4].decode("latin-1")


class IncomingRequest:
    """What the runner is sent for one request: its head, without framing headers.

    The one pass over the headers also keeps what the proxy checks before forwarding:
    ``authorization`` (never forwarded), ``content_length`` and ``header_bytes``.
    """

    __slots__ = ("action", "authorization", "content_length", "content_type", "head",
                 "header_bytes", "method", "request_id", "route", "started")

    def __init__(self, scope: Scope, action: str) -> None:
        self.method: str = scope["method"]
        self.action = action
        self.started = time.perf_counter()
        # The routing endpoint it came through (``splits``), else None.
        self.route: tuple[str, str] | None = scope.get(ROUTE)
        query: bytes = scope.get("query_string") or b""
        parts = [self.method.encode(), b" /", action.encode(), b"?" if query else b"", query,
                 b" HTTP/1.1\r\n"]
        request_id = forwarded = length = authorization = content_type = None
        size = 0
        for key, value in scope["headers"]:  # names are lower-case, values validated
            size += len(key) + len(value) + 4
            if key in REQUEST_DROP:
                if key == b"x-request-id":
                    if request_id is None:  # the first one, if it is safe
                        request_id = value if SAFE_REQUEST_ID.fullmatch(value) else b""
                elif key == b"x-forwarded-for":
                    forwarded = value  # the last one
                elif key == b"content-length":
                    length = value
                elif key == b"authorization":
                    authorization = value
                continue
            if key == b"content-type":
                content_type = value  # what merging requests compares (``batching``)
            parts += (key, b": ", value, b"\r\n")
        client = scope.get("client")
        if client:
            address = client[0].encode()
            forwarded = forwarded + b", " + address if forwarded else address
        if forwarded:
            parts += (b"x-forwarded-for: ", forwarded, b"\r\n")
        self.request_id: bytes = request_id or b"%032x" % _ids.getrandbits(128)
        parts += (b"x-request-id: ", self.request_id, b"\r\n")
        self.head = b"".join(parts)
        # The server has already refused a Content-Length that is not a number; the check
        # only keeps int() from raising.
        self.content_length: int | None = int(length) if length and length.isdigit() else None
        self.authorization: str | None = authorization.decode("latin-1") if authorization \
            else None
        self.header_bytes = size
        self.content_type: bytes | None = content_type


async def read_body(request: IncomingRequest, receive: Receive, limit: int
                        ) -> bytes | AsyncIterator[bytes]:
    """The request's body: whole when it is at most SMALL_BODY (with or without a
    Content-Length), else an iterator that streams it (the part read so far first)."""
    length = request.content_length
    if length is None and request.method not in ("POST", "PUT"):
        return b""
    if length is not None and length > SMALL_BODY:
        return _stream_body(receive, limit, [])
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk: bytes = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if size > SMALL_BODY:  # chunked and large: stream it from here
            if size > limit:
                raise BodyTooLarge()
            return _stream_body(receive, limit, chunks)


async def _stream_body(receive: Receive, limit: int, first: list[bytes]
                       ) -> AsyncIterator[bytes]:
    """The request body as it arrives, after ``first``; past ``limit`` bytes in all,
    BodyTooLarge (no buffering)."""
    total = 0
    for chunk in first:
        total += len(chunk)
        if chunk:
            yield chunk
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
