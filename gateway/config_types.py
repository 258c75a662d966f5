"""The config's scalar types (durations, sizes) and the strict base of its sections."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from runners.memory import parse_size

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"5m"``, ``"1h"``, ``"250ms"`` → seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 90, 90s, 5m or 1h")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"must be a duration such as 90, 90s, 5m or 1h, not {value!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_residency(value: Any) -> float | None:
    """``auto`` (None: as long as the runner took to start) or a duration."""
    if value == "auto" or value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(f"must be auto or a duration such as 2s, not {value!r}") from None


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
NAME = r"^[^/:]+$"  # MLflow allows every character in a model name but '/' and ':'


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
