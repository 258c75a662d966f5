"""GatewayServer: uvicorn's server with the gateway's own signal handling.

uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown, so the process would end
"killed by SIGTERM"; a gateway that drained and stopped every runner exits 0 instead.
The handlers only record the signal; uvicorn's main loop acts on ``should_exit``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Generator
from types import FrameType

import uvicorn


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.on_hangup: Callable[[], None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = {signal.SIGINT: self._exit, signal.SIGTERM: self._exit,
                   signal.SIGHUP: self._hangup}
        original = {sig: signal.signal(sig, handler) for sig, handler in handled.items()}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C skips the drain
        self.should_exit = True

    def _hangup(self, sig: int, frame: FrameType | None) -> None:
        if self.on_hangup is not None:
            self.on_hangup()
