"""The watchdog: stops every runner when the gateway dies, however it dies.

``PR_SET_PDEATHSIG`` reaches a runner's first process only; `mlflow models serve` and
multi-worker uvicorn start grandchildren that would outlive a SIGKILLed gateway. This
small process (no MLflow imports) reads ``+PGID`` / ``-PGID`` lines from the gateway on
stdin; when stdin closes (the gateway is gone), it kills every process group it holds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time


class Watchdog:
    """The gateway's end: starts the watchdog process (a supervised helper) and tells it
    which groups to hold; a restarted watchdog is told every group held so far."""

    name = "watchdog"

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._groups: set[int] = set()

    async def start(self) -> None:
        # Run as a plain script: no package import, a few MB, started in milliseconds.
        # Its own session, and no parent-death signal: it must outlive the gateway.
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", os.path.abspath(__file__), env=self._env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True)
        for pgid in self._groups:
            self._send(f"+{pgid}\n")

    async def wait(self) -> int | None:
        assert self._proc is not None
        return await self._proc.wait()

    def _send(self, line: str) -> None:
        if self._proc is not None and self._proc.stdin is not None and \
                self._proc.returncode is None:
            try:
                self._proc.stdin.write(line.encode())
            except (BrokenPipeError, ConnectionResetError, RuntimeError):
                pass  # it is restarted, and then told every group again

    def watch(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._send(f"+{pgid}\n")

    def unwatch(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._send(f"-{pgid}\n")

    async def close(self) -> None:
        """Stop the watchdog after the pool stopped every runner (it then holds none)."""
        if self._proc is None or self._proc.stdin is None:
            return
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 5)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


def _kill(groups: set[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> int:
    """The watchdog process itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the gateway
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the gateway closes stdin to stop us
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] == "+" and line[1:].isdigit():
            groups.add(int(line[1:]))
        elif line[:1] == "-" and line[1:].isdigit():
            groups.discard(int(line[1:]))
    if groups:  # stdin closed: the gateway is gone or shut down
        _kill(groups, signal.SIGTERM)
        time.sleep(1.0)
        _kill(groups, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
