"""What one client may cost the gateway: the request head's size, and read deadlines.

:class:`HeadMeter` counts a request head's bytes as they arrive, before the parser sees
them, so that a head past ``max_header_size`` is refused as soon as it is, not once it
is complete (a 24 MiB header, or one trickled in byte by byte, would otherwise be held
and re-parsed until it ends). :class:`Deadline` is the one timer a connection runs for
what it is waiting on: a head, a stalled body, or a caller that does not read.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

END_OF_HEAD = b"\r\n\r\n"
# SO_LINGER on with 0 s: closing sends a reset and drops what is still unsent.
LINGER_RESET = struct.pack("ii", 1, 0)


class HeadMeter:
    """Bytes of the request head received so far, up to its end (CRLF CRLF)."""

    __slots__ = ("_tail", "limit", "open", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = True  # a head is (or will be) arriving: the next bytes count
        self.size = 0
        self._tail = b""

    def start(self) -> None:
        """The next bytes begin a new head (the previous request is complete)."""
        self.open, self.size, self._tail = True, 0, b""

    def feed(self, data: bytes) -> bool:
        """Count ``data``; True when the head is over the limit. Bytes after the end of
        the head (a body in the same segment) are not counted."""
        if not self.open:
            return False
        seen = self._tail + data
        end = seen.find(END_OF_HEAD)
        if end < 0:
            self.size += len(data)
            self._tail = seen[-3:]
        else:
            self.size += end + len(END_OF_HEAD) - len(self._tail)
            self.open, self._tail = False, b""
        return self.size > self.limit


class Deadline:
    """One timer that can be re-armed; arming it again replaces the previous one."""

    __slots__ = ("_handle", "_loop", "armed")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self.armed = False  # an attribute, not a property: read on every request

    def arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self.disarm()
        self._handle = self._loop.call_later(seconds, self._fire, callback)
        self.armed = True

    def _fire(self, callback: Callable[[], None]) -> None:
        self._handle, self.armed = None, False
        callback()

    def disarm(self) -> None:
        if self.armed:
            assert self._handle is not None
            self._handle.cancel()
            self._handle, self.armed = None, False

