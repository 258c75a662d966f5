"""Log setup: one logger tree (``model_gateway``), text or JSON lines, context fields kept."""

from __future__ import annotations

import json
import logging
import sys

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _fields(record)
        endpoint = extra.pop("endpoint", None)
        if endpoint is not None:
            version = extra.pop("version", None)
            line = line.replace(record.getMessage(),
                                f"[{endpoint}{'@v' + str(version) if version else ''}] "
                                f"{record.getMessage()}", 1)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"ts": self.formatTime(record), "level": record.levelname,
                                  "logger": record.name, "message": record.getMessage()}
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
