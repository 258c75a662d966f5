"""Fixtures: a real MLflow registry, real gateway processes on free ports, the process table."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import httpx
import psutil
import pytest
import yaml

from tests.registry import Registry, build_registry

ROOT = Path(__file__).resolve().parent.parent
Answer = TypeVar("Answer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def owned_processes(owner: str) -> list[psutil.Process]:
    """Every live process that carries this gateway's owner mark in its environment."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("MODEL_GATEWAY_OWNER") == owner and proc.status() != "zombie":
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def is_runner(proc: psutil.Process) -> bool:
    """A runner's top process (direct launch, or the CLI of `mlflow models serve`)."""
    try:
        cmd = " ".join(proc.cmdline()).strip()
    except psutil.Error:
        return False
    # A runner names itself (its process title): forked runners have no command line of
    # their own.
    return ("runners.serve" in cmd or "runners/serve.py" in cmd or " models serve " in cmd
            or cmd.startswith("model-gateway runner "))


def runner_processes(owner: str) -> list[psutil.Process]:
    return [p for p in owned_processes(owner) if is_runner(p)]


class ClientThreads(Generic[Answer]):
    """Client threads sending requests back to back until the block ends; each keeps
    its answers in order (``answers[i]``). Subclasses send in ``_run(i)``."""

    def __init__(self, clients: int) -> None:
        self.answers: list[list[Answer]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        raise NotImplementedError

    def running(self) -> bool:
        return not self._stop.is_set()

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    @property
    def all(self) -> list[Answer]:
        return [a for client in self.answers for a in client]


ADMIN_TOKEN = "admin-token-of-the-test-suite"


class GatewayProcess:
    """`model-gateway serve` as a user starts it, on a free port, with a config we write.

    A config without ``auth`` gets an admin token, so that :meth:`status` can show runner
    details (the admin API's); a test about auth sets its own.
    """

    def __init__(self, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = env or {}
        if "auth" not in config:
            config = {**config, "auth": {"admin_tokens": [ADMIN_TOKEN]}}
        tokens = config["auth"].get("admin_tokens") or []
        self.admin = {"Authorization": f"Bearer {tokens[0]}"} if tokens else None
        config = {**config, "server": {"host": "127.0.0.1", "port": self.port}}
        self.config_path = workdir / f"gateway-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.url = f"http://127.0.0.1:{self.port}"
        self.owner = f"gateway@127.0.0.1:{self.port}"
        self.log_path = workdir / f"gateway-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway did not come up:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def endpoints(self) -> list[dict[str, Any]]:
        """Every endpoint's status; with runner details when there is an admin token."""
        if self.admin is None:
            return self.client.get("/models").json()["endpoints"]
        return self.client.get("/admin/endpoints", headers=self.admin).json()["endpoints"]

    def status(self, name: str, alias: str) -> dict[str, Any]:
        if self.admin is None:
            return self.client.get(f"/models/{name}/{alias}").json()
        return next(e for e in self.endpoints() if (e["name"], e["alias"]) == (name, alias))

    def predict(self, name: str, alias: str, payload: Any, headers: dict[str, str] | None = None,
                **kw: Any) -> httpx.Response:
        return self.client.post(f"/models/{name}/{alias}/invocations", content=json.dumps(payload),
                                headers={"Content-Type": "application/json", **(headers or {})},
                                **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.client.close()
        self._log.close()
        # Whatever happened, leave nothing behind for the next test.
        for proc in owned_processes(self.owner):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return self.proc.returncode


def split_answers(data: bytes, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """``data`` (what one connection received) split into one Content-Length framed answer
    per request method: (status, lower-case headers, body); nothing may be left over."""
    answers = []
    for method in methods:
        head, data = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        size = 0 if method == "HEAD" else int(headers["content-length"])
        answers.append((int(lines[0].split()[1]), headers, data[:size]))
        data = data[size:]
    assert data == b"", data[:200]
    return answers


def metric(gw: GatewayProcess, series: str, /, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in gw.client.get("/metrics").text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        sample, value = line.rsplit(" ", 1)
        base, _, rest = sample.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if base == series and got == want:
            return float(value)
    return 0.0


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return build_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture
def start_gateway(tmp_path: Path, registry: Registry) -> Iterator[Any]:
    """Start gateways for one test; each is stopped (and its processes killed) afterwards."""
    started: list[GatewayProcess] = []

    def start(endpoints: list[dict[str, Any]], **config: Any) -> GatewayProcess:
        env, port = config.pop("env", None), config.pop("port", None)
        full = {"tracking_uri": registry.tracking_uri, **config, "endpoints": endpoints}
        gw = GatewayProcess(full, tmp_path, env, port)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
