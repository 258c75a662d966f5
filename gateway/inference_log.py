"""The inference log: one JSON line per sampled prediction, to judge model versions by.

    inference_log: {path: /var/log/model-gateway/inference.jsonl, sample: 1%,
                    max_body: 16KiB, max_file_size: 100MiB, keep: 5}

A line holds the time, the endpoint (and the routing endpoint it came through), the
version and URI that answered, the request id, status and latency, and the request body
and answer: parsed JSON when they are JSON and at most ``max_body`` bytes, else their
size. Shadow comparisons (``shadow``) get lines of their own.

The request path only appends the record (its bodies as they are) to a bounded buffer; a
writer thread takes the buffer in batches, parses the bodies, formats the lines and
appends them to the file, rotating it by size
(``path.1`` … ``path.<keep>``). When the disk cannot keep up and the buffer is full, new
lines are dropped and counted (``model_gateway_inference_log_lines_total{result}``): the
log never slows a request and never grows the gateway's memory without bound.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runners.spread import Spread

log = logging.getLogger("model_gateway.inference_log")

BUFFER = 10_000  # lines waiting for the writer, at most


@dataclass(frozen=True)
class LogSpec:
    path: str
    fraction: float  # of the endpoint's predictions
    max_body: int  # bytes of a body kept as JSON
    max_file_size: int
    keep: int


@dataclass(frozen=True, slots=True)
class Body:
    """A request or answer body in a record; the writer thread turns it into JSON."""

    data: bytes
    content_type: bytes | None
    max_body: int

    def field(self) -> Any:
        """Parsed JSON when it is JSON and small enough, else its size."""
        if len(self.data) <= self.max_body and \
                (self.content_type is None or b"json" in self.content_type.lower()):
            try:
                return json.loads(self.data)
            except (ValueError, RecursionError):
                pass
        return {"bytes": len(self.data)}


def _encode(value: Any) -> Any:
    return value.field() if isinstance(value, Body) else str(value)


class LogFile:
    """One log file: a bounded buffer in memory, a writer thread, rotation by size."""

    def __init__(self, spec: LogSpec, count: Callable[[str, int], None]) -> None:
        self.spec = spec
        self.path = Path(spec.path)
        self._count = count
        self._lines: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._write_forever, daemon=True,
                                        name=f"inference-log {spec.path}")
        self._thread.start()

    def add(self, record: dict[str, Any]) -> None:
        """Queue a line; drop it (counted) when the buffer is full. Never blocks."""
        if len(self._lines) >= BUFFER or self._closed:
            self._count("dropped", 1)
            return
        self._lines.append(record)  # formatted by the writer, off the event loop
        if len(self._lines) == 1:
            with self._wake:
                self._wake.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered (for up to ``timeout``), then stop the writer."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    def _write_forever(self) -> None:
        while True:
            with self._wake:
                while not self._lines and not self._closed:
                    self._wake.wait(1.0)
                if not self._lines and self._closed:
                    return
            batch: list[str] = []
            while self._lines and len(batch) < 1000:
                record = self._lines.popleft()
                try:
                    batch.append(json.dumps(record, separators=(",", ":"), default=_encode))
                except (ValueError, RecursionError):  # a NaN answer, a deep body: its size
                    record = {k: ({"bytes": len(v.data)} if isinstance(v, Body) else v)
                              for k, v in record.items()}
                    batch.append(json.dumps(record, separators=(",", ":"), default=str))
            try:
                self._append(batch)
                self._count("written", len(batch))
            except OSError as exc:
                log.error("inference log %s: %s; %d lines dropped", self.path, exc, len(batch))
                self._count("dropped", len(batch))
                time.sleep(1.0)  # a full or read-only disk: do not spin

    def _append(self, batch: list[str]) -> None:
        data = ("\n".join(batch) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.spec.max_file_size:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        keep = self.spec.keep
        for i in range(keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        if keep > 0:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()


class InferenceLogs:
    """The log files of every endpoint that logs, and each endpoint's sampler."""

    def __init__(self, count: Callable[[str, int], None]) -> None:
        self._count = count
        self._files: dict[str, LogFile] = {}
        self._samplers: dict[tuple[str, str], tuple[LogSpec, Spread]] = {}

    def sampled(self, key: tuple[str, str], spec: LogSpec) -> LogFile | None:
        """The file this request's line goes to, when the request is in the sample."""
        held = self._samplers.get(key)
        if held is None or held[0] != spec:
            held = self._samplers[key] = (spec, Spread())
        if not held[1].sampled(spec.fraction):
            return None
        file = self._files.get(spec.path)
        # Endpoints may share a file (config checks they agree on its size and keep).
        if file is None or (file.spec.max_file_size, file.spec.keep) != \
                (spec.max_file_size, spec.keep):
            if file is not None:
                file.close(0)
            file = self._files[spec.path] = LogFile(spec, self._count)
        return file

    def close(self) -> None:
        files, self._files = list(self._files.values()), {}
        for file in files:
            file.close()
