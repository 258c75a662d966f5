"""HTTP/1.1 answers as bytes, for the answers the server protocol writes itself.

A proxied answer served from the protocol's callbacks (``direct.py``), and the edge's
refusals (431, 408, 400), are written whole, in one piece, without the ASGI cycle.
"""

from __future__ import annotations

import http
from collections.abc import Iterable

from .errors import error_body

STATUS_LINE = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, s.phrase.encode()) for s in http.HTTPStatus}
Headers = Iterable[tuple[bytes, bytes]]


def answer(status_line: bytes, headers: Headers, body: bytes, *, head_only: bool,
           has_length: bool, keep_alive: bool) -> bytes:
    """A whole answer: ``headers`` as they are, a Content-Length when they have none and
    the status allows a body, ``connection: close`` when the connection ends after it."""
    status = int(status_line[9:12])
    head = [status_line]
    for name, value in headers:
        head += (name, b": ", value, b"\r\n")
    if not has_length and not head_only and status not in (204, 304):
        head.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(body)
    return b"".join(head)


def refusal(status_line: bytes, default_headers: Headers, code: str, message: str) -> bytes:
    """A whole error answer that closes the connection, in the gateway's error shape."""
    body = error_body(code, message)
    head = [status_line]
    for name, value in default_headers:
        head += (name, b": ", value, b"\r\n")
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % len(body))
    return b"".join(head) + body
