"""Free loopback ports for runners, never handed out twice while in use."""

from __future__ import annotations

import socket


class PortAllocator:
    """Asks the kernel for a free port and remembers which ones runners hold.

    The kernel picks from its ephemeral range; remembering our own ports covers the gap
    between choosing a port and the runner binding it, when many runners start at once.
    """

    def __init__(self) -> None:
        self._held: set[int] = set()

    def acquire(self) -> int:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port: int = sock.getsockname()[1]
            if port not in self._held:
                self._held.add(port)
                return port
        raise RuntimeError("no free loopback port found")

    def release(self, port: int) -> None:
        self._held.discard(port)

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)
