"""How a runner process is launched: a :class:`LaunchSpec` (data), and one launcher per way.

A launch is described once, as data; each launcher turns it into a process:

- ``fork`` (the default, ``env_manager: local``): a child of the zygote, which imported
  MLflow, pandas and scikit-learn once (``runners.zygote``); it calls
  ``runners.serve.run`` with the spec's options. Sub-second cold starts, pages shared.
- ``direct`` (``env_manager: local``): a fresh ``python -m runners.serve``.
- ``env`` (any other ``env_manager``): the model's own built environment runs
  ``serve.py`` by path (``runners.environment`` builds it first).
- ``cli``: ``mlflow models serve`` exactly as a user would run it (two processes: the
  CLI stays alive beside the uvicorn it starts).

Every launcher returns a :class:`RunnerProcess`, in its own process group.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .process import OWNER_ENV, spawn
from .serve import ServeOptions
from .spec import EndpointSpec, PoolSpec

RUNNER_TIMEOUT_SLACK = 5  # seconds
SERVE_SCRIPT = str(Path(__file__).resolve().with_name("serve.py"))
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class RunnerProcess(Protocol):
    """What the pool needs of a runner's process (``asyncio.subprocess.Process`` has it)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdout(self) -> asyncio.StreamReader | None: ...

    async def wait(self) -> int: ...


@dataclass(frozen=True)
class LaunchSpec:
    """Everything one runner is started from."""

    label: str  # the endpoint, name/alias
    version: str | None  # the registry version it serves, if any
    model_uri: str  # what it loads: a pinned models:/ URI, a path, a downloaded copy
    launcher: str  # fork | direct | env | cli
    env: Mapping[str, str] = field(repr=False)
    port: int | None = None  # a loopback TCP port: `cli` runners, or pool.runner_tcp
    socket: str | None = None  # a filesystem unix socket in the pool's private directory
    workers: int = 1
    request_timeout: float = 60.0
    python: Path | None = None  # a built environment's interpreter
    env_manager: str = "local"
    nice: int = 0  # lower CPU priority by this (0–19)

    @property
    def title(self) -> str:
        version = f" v{self.version}" if self.version else ""
        port = f" port {self.port}" if self.port else ""
        return f"model-gateway runner {self.label}{version}{port}"

    def serve_options(self) -> ServeOptions:
        # The runner gives up a little after the gateway's request_timeout: the caller gets
        # the gateway's own JSON 504, not MLflow's plain-text one racing it.
        timeout = math.ceil(self.request_timeout) + RUNNER_TIMEOUT_SLACK
        return ServeOptions(model_uri=self.model_uri, port=self.port, unix_socket=self.socket,
                            workers=self.workers, timeout=timeout, title=self.title,
                            nice=self.nice)

    def argv(self) -> list[str]:
        """The command line of every launcher but ``fork``."""
        options = self.serve_options()
        if self.launcher == "env":
            # By path, not `-m runners.serve`: the model's environment has none of the
            # gateway's packages, and serve.py imports only MLflow.
            assert self.python is not None
            return [str(self.python), SERVE_SCRIPT, *options.argv()]
        if self.launcher in ("direct", "fork"):
            return [sys.executable, "-m", "runners.serve", *options.argv()]
        nice = ["nice", "-n", str(self.nice)] if self.nice else []
        return [*nice, sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri,
                "--env-manager", self.env_manager, "-h", "127.0.0.1", "-p", str(self.port),
                "--workers", str(self.workers), "--timeout", str(options.timeout)]


# The fork launcher's process comes from the zygote (runners.forked); the others spawn.
Fork = Callable[[LaunchSpec], Awaitable[RunnerProcess]]


async def start_process(spec: LaunchSpec, fork: Fork) -> RunnerProcess:
    """Start the runner ``spec`` describes, with its launcher."""
    if spec.launcher == "fork":
        return await fork(spec)
    return await spawn(spec.argv(), dict(spec.env))


def effective_launcher(spec: EndpointSpec) -> str:
    """Another env_manager than local: ``env``, serve.py run by the model's own python."""
    return spec.launcher if spec.env_manager == "local" else "env"


def needs_tcp(spec: EndpointSpec, pool: PoolSpec) -> bool:
    """Whether a runner listens on a TCP port: `mlflow models serve` has nothing else;
    ``pool.runner_tcp`` asks for one (to call runners directly, e.g. in benchmarks)."""
    return effective_launcher(spec) == "cli" or pool.runner_tcp


def uses_socket(spec: EndpointSpec, pool: PoolSpec) -> bool:
    """Whether a runner listens on a unix socket: every one ``runners.serve`` runs, except
    several workers asked to use TCP (uvicorn's workers share one listener).

    A filesystem socket in the pool's own directory (mode 0700) is reachable by the
    gateway's user only, and costs both sides less per request than TCP over loopback.
    """
    return effective_launcher(spec) != "cli" and not (spec.workers > 1 and pool.runner_tcp)


def runner_env(pool: PoolSpec, owner: str) -> dict[str, str]:
    env = dict(os.environ)
    # `mlflow models serve` runs `exec uvicorn ...` through bash: the interpreter's own
    # bin/ must come first on PATH or the runner fails with `uvicorn: not found`.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [PROJECT_ROOT, env.get("PYTHONPATH")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    # `mlflow models serve` runs the uvicorn CLI, which reads these: its access log would
    # repeat, through the runner's output, the line the gateway writes for each request.
    env.setdefault("UVICORN_ACCESS_LOG", "false")
    env.setdefault("UVICORN_PROXY_HEADERS", "false")
    if pool.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = pool.tracking_uri
    if pool.registry_uri:
        env["MLFLOW_REGISTRY_URI"] = pool.registry_uri
    env[OWNER_ENV] = owner
    return env


def model_env_vars(env: Mapping[str, str], python: Path) -> dict[str, str]:
    """A runner's environment for a built model environment: its bin/ first on PATH, no
    gateway venv or source tree on the path, and bytecode saved (PYTHONDONTWRITEBYTECODE
    would make every start recompile the model's libraries: seconds each time)."""
    out = {k: v for k, v in env.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    out["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    return out
