"""Processes the gateway owns: each in its own process group, dying with the gateway.

Every process the pool starts (runners, the zygote, the resolver, environment builds)
goes through :func:`spawn`: its own session (so :func:`kill_group` reaches everything it
starts), a parent-death signal, and its output merged into one pipe read by
:func:`output_lines`. :func:`find_leftovers` finds the groups of an earlier gateway with
the same owner mark, which a restarted gateway kills before it starts anything.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

PR_SET_PDEATHSIG = 1
OWNER_ENV = "MODEL_GATEWAY_OWNER"


def die_with_parent(parent_pid: int) -> None:
    """Runs in a child between fork and exec: SIGKILL it when the gateway dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the gateway died before prctl took effect
        os._exit(1)


async def spawn(argv: list[str], env: dict[str, str], *,
                stdin: int = asyncio.subprocess.DEVNULL) -> asyncio.subprocess.Process:
    """Start argv in its own process group (session), output merged into one pipe."""
    parent = os.getpid()
    preexec = (lambda: die_with_parent(parent)) if sys.platform.startswith("linux") else None
    return await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=preexec,
    )


def runtime_dir(owner: str) -> Path:
    """The directory of a gateway's runner sockets: one per owner (a restarted gateway
    finds its predecessor's), under XDG_RUNTIME_DIR or the temporary directory, made
    private (0700) when the pool first uses it."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    digest = hashlib.sha256(f"{os.getuid()}:{owner}".encode()).hexdigest()[:16]
    return Path(base) / f"model-gateway-{digest}"


def kill_group(pid: int, sig: int) -> bool:
    """Signal a process group; False if it is already gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


def find_leftovers(owner: str) -> list[int]:
    """Process groups started by an earlier gateway with the same owner id (Linux /proc)."""
    marker = f"{OWNER_ENV}={owner}".encode()
    found: set[int] = set()
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            try:
                found.add(os.getpgid(int(entry.name)))
            except ProcessLookupError:
                continue
    return sorted(found)


async def output_lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    """A process's output, line by line, blank lines skipped, until it closes."""
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line longer than the stream limit; keep reading
            continue
        if not raw:
            return
        if line := raw.decode(errors="replace").rstrip():
            yield line
