"""Log setup: one logger tree (``model_gateway``), text or JSON lines, context fields kept.

The access log writes a line per request, so formatting is kept cheap: the timestamp is
formatted once per second, and a batch of records (``batch()``) leaves in one write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import TextIO

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}


_PLAIN = re.compile(r"[\w.:/@%+,=-]+")


_plain = _PLAIN.fullmatch


def _quoted(value: object) -> str:
    """A field value as text that cannot forge another field or line: as it is when
    plain, else JSON-quoted (spaces, quotes, control and non-ASCII characters escaped)."""
    if type(value) in (int, float):
        return str(value)
    text = str(value)
    return text if text.isascii() and _plain(text) else json.dumps(text)


class _Formatter(logging.Formatter):
    """``formatTime`` as logging's default (``2026-11-25 19:05:01,123``), cached per second."""

    _cached = (-1, "")  # (second, its text): one tuple, so threads never see half of it

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, stamp = self._cached
        if int(record.created) != second:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
            self._cached = (int(record.created), stamp)
        return f"{stamp},{int(record.msecs):03d}"

    def _exception(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        text = record.exc_text or ""
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}" if text else \
                self.formatStack(record.stack_info)
        return text


class TextFormatter(_Formatter):
    """``time LEVEL logger [endpoint@vN] message key=value…``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        extra = _fields(record)
        endpoint = extra.pop("endpoint", None)
        if endpoint is not None:
            version = extra.pop("version", None)
            message = f"[{endpoint}{'@v' + str(version) if version else ''}] {message}"
        line = f"{self.formatTime(record)} {record.levelname} {record.name} {message}"
        if extra:
            line += " " + " ".join(f"{k}={_quoted(v)}" for k, v in extra.items())
        trace = self._exception(record)
        return f"{line}\n{trace}" if trace else line


class JsonFormatter(_Formatter):
    """One JSON object per line: ts, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"ts": self.formatTime(record), "level": record.levelname,
                                  "logger": record.name, "message": record.getMessage()}
        out.update(_fields(record))
        trace = self._exception(record)
        if trace:
            out["exc"] = trace
        return json.dumps(out, default=str)


class LineHandler(logging.StreamHandler[TextIO]):
    """A stream handler that, inside ``batch()``, collects lines and writes them at once."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._lines: list[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._lines is None:
            super().emit(record)
            return
        try:
            self._lines.append(self.format(record) + self.terminator)
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)

    # Not hold/release: logging.Handler's lock methods are acquire() and release().
    def start_batch(self) -> None:
        if self._lines is None:
            self._lines = []

    def end_batch(self) -> None:
        lines, self._lines = self._lines, None
        if lines:
            try:
                self.stream.write("".join(lines))
                self.flush()
            except Exception:  # noqa: BLE001
                self.handleError(logging.makeLogRecord({"msg": "batched log lines"}))


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Records handled inside leave the root logger's line handlers in one write each."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, LineHandler)]
    for handler in handlers:
        handler.start_batch()
    try:
        yield
    finally:
        for handler in handlers:
            handler.end_batch()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    # No formatter here reads a record's thread or process: skip looking them up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LineHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
