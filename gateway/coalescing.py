"""CoalescingTransport: an answer's head and body leave in one write.

uvicorn writes an answer's head on ``http.response.start`` and its body on
``http.response.body``: two system calls and two TCP segments for every small answer, and
the client is woken twice. Here a write is held back until the next one, which takes it
along, or until the end of the event-loop step: a small answer leaves in one piece, as
soon as its body is written, and nothing waits for a later step.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescingTransport:
    """A transport that sends writes in pairs: a write is held until the next write
    (which sends both at once) or the end of the current event-loop step, whichever comes
    first. ``close`` and ``write_eof`` send what is held first; the rest is the wrapped
    transport's.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)  # a no-op when the next write came first
        else:
            self._held = None
            self._send(held + data)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._send(held)

    def _send(self, data: bytes) -> None:
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def send_now(self, data: bytes) -> None:
        """Write ``data`` at once, after anything held."""
        held, self._held = self._held, None
        self._send(held + data if held is not None else data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()  # close() sends what is buffered, so buffered here too
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
