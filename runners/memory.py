"""How much memory a runner's process group uses: PSS where the kernel gives it, else RSS.

PSS (proportional set size) splits shared pages among the processes sharing them, so the
sum over runners is what they really cost the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")


def group_members(pgid: int) -> list[int]:
    """Pids of every live process in process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def process_memory(pid: int) -> int:
    """Bytes of one process: Pss from smaps_rollup, falling back to VmRSS."""
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in (_PROC / str(pid) / name).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return 0


def group_memory(pgid: int) -> int:
    """Bytes used by a whole runner: every process of its group (CLI, uvicorn, workers)."""
    return sum(process_memory(pid) for pid in group_members(pgid))


def parse_size(text: str | int | float) -> int:
    """``4GiB``, ``512MiB``, ``2G``, ``1500000`` → bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
             "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tib": 2**40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    if not number or unit not in units:
        raise ValueError(f"must be a size such as 4GiB, 512MiB or 0, not {text!r}")
    return int(float(number) * units[unit])
