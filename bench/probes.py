"""Small measurements the sections share: memory from /proc, /metrics, one prediction.

- :func:`memory` reads a process's PSS and RSS from ``/proc/PID/smaps_rollup``.
- :func:`scrape` parses the gateway's Prometheus text; :func:`metric` sums one family.
- :func:`predict` POSTs one body and returns the status and the ``X-Model-Version`` header.
- :func:`write_config` writes a gateway config (JSON is YAML) into a work directory.
- :func:`leftovers` lists the pids of a set that are still alive (zombies excluded).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Memory:
    pid: int
    pss: int  # bytes
    rss: int


def memory(pid: int) -> Memory:
    """PSS and RSS of ``pid`` in bytes (Linux ``smaps_rollup``)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("Pss:", "Rss:"):
            fields[parts[0][:-1]] = int(parts[1]) * 1024
    return Memory(pid=pid, pss=fields["Pss"], rss=fields["Rss"])


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


Sample = tuple[str, dict[str, str], float]


def scrape(base_url: str, timeout: float = 10.0) -> list[Sample]:
    """Every sample of ``GET {base_url}/metrics``: (name, labels, value)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    samples = []
    for line in text.splitlines():
        if line.startswith("#") or not (match := _SAMPLE.match(line)):
            continue
        name, labels, value = match.groups()
        samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def metric(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(value for n, have, value in samples
               if n == name and all(have.get(k) == v for k, v in labels.items()))


def by_label(samples: Iterable[Sample], name: str, label: str) -> dict[str, float]:
    """``name``'s samples summed per value of ``label``."""
    totals: dict[str, float] = {}
    for n, labels, value in samples:
        if n == name and label in labels:
            totals[labels[label]] = totals.get(labels[label], 0.0) + value
    return totals


def predict(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, str | None]:
    """POST ``body`` as JSON: (status, X-Model-Version or None); HTTP errors not raised."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read()
            return resp.status, resp.headers.get("X-Model-Version")
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, exc.headers.get("X-Model-Version")


ADMIN_TOKEN = "bench-admin-token"  # runner details (pid, port) are in the admin API only


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config``; one without ``auth`` gets ADMIN_TOKEN as its admin token."""
    config = {"auth": {"admin_tokens": [ADMIN_TOKEN]}, **config}
    path.write_text(json.dumps(config, indent=1))
    return path


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def leftovers(pids: Iterable[int]) -> list[int]:
    return sorted(pid for pid in pids if alive(pid))
