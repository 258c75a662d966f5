"""Exponential backoff: 1 s, 2 s, 4 s … capped at a minute, so nothing that keeps failing
(a runner's start, a cutover, a helper process) is retried at full speed."""

from __future__ import annotations

BASE, CAP = 1.0, 60.0


def backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row."""
    return float(min(BASE * 2.0 ** max(failures - 1, 0), CAP))
