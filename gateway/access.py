"""The access log: one line per proxied request, handed to the logger in batches."""

from __future__ import annotations

import asyncio
import atexit
import logging

from . import logs


class AccessLog:
    """One INFO line per proxied request (``METHOD path status`` and context fields).

    Records are made when a request ends, so their timestamps are exact, and handed to
    the logger's handlers in batches: every ``interval`` seconds or ``batch`` records,
    whichever comes first, and at exit (as nginx's buffered ``access_log`` does). Run
    back to back, the logging code stays in the CPU's caches and costs about half as much
    per line as between two requests, and the batch leaves in one write. Records are made
    without looking up the caller.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 0.05,
                 batch: int = 256) -> None:
        self.logger = logger
        self.interval = interval
        self.batch = batch
        self._pending: list[logging.LogRecord] = []
        self._timer: asyncio.TimerHandle | None = None
        atexit.register(self.flush)

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def add(self, args: tuple[object, ...], fields: dict[str, object]) -> None:
        self._pending.append(self.logger.makeRecord(
            self.logger.name, logging.INFO, __file__, 0, "%s %s %s", args, None, "access",
            fields))
        if len(self._pending) >= self.batch:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        with logs.batch():
            for record in pending:
                self.logger.handle(record)
