"""How a runner process is launched: its command line, environment and process group.

Three launchers serve the same MLflow scoring protocol:

- ``cli``: ``mlflow models serve`` exactly as a user would run it (two processes:
  the CLI stays alive beside the uvicorn it starts).
- ``direct``: ``python -m runners.serve``, one process that loads the model and runs
  MLflow's own scoring app. Used for ``env_manager: local`` only; other environment
  managers always go through the CLI, which builds the model's environment.
- ``fork`` (the default): the direct launcher's command, run in a child forked from a
  zygote that has imported MLflow, pandas and scikit-learn once (``runners.zygote``):
  sub-second cold starts, pages shared copy-on-write. ``env_manager: local`` only.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from .spec import EndpointSpec, PoolSpec

PR_SET_PDEATHSIG = 1
RUNNER_TIMEOUT_SLACK = 5  # seconds
OWNER_ENV = "MODEL_GATEWAY_OWNER"
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


SERVE_SCRIPT = str(Path(__file__).resolve().with_name("serve.py"))


def effective_launcher(spec: EndpointSpec) -> str:
    """Another env_manager than local: ``env``, serve.py run by the model's own python."""
    return spec.launcher if spec.env_manager == "local" else "env"


def runner_socket(spec: EndpointSpec, port: int) -> str | None:
    """The abstract unix socket a runner serves the gateway on, beside its TCP port.

    Only runners that ``runners.serve`` runs in one process have it (not the CLI's, not
    several workers), and only on Linux: abstract names need no file to create or clean
    up. A unix socket costs both sides less per request than TCP over loopback.
    """
    if not sys.platform.startswith("linux") or spec.workers != 1 \
            or effective_launcher(spec) == "cli":
        return None
    return f"model-gateway/{os.getpid()}/{port}"


def runner_argv(spec: EndpointSpec, model_uri: str, port: int,
                python: Path | None = None, socket: str | None = None) -> list[str]:
    """The runner's command line; ``socket``: its runner_socket() name, if it has one."""
    # The runner gives up a little after the gateway's request_timeout: the caller gets the
    # gateway's own JSON 504, not MLflow's plain-text one racing it.
    runner_timeout = math.ceil(spec.request_timeout) + RUNNER_TIMEOUT_SLACK
    common = ["--workers", str(spec.workers), "--timeout", str(runner_timeout)]
    if socket is not None:
        common += ["--abstract-socket", socket]
    if python is not None:
        # By path, not `-m runners.serve`: the model's environment has neither this
        # package nor aiohttp, and serve.py imports only MLflow.
        return [str(python), SERVE_SCRIPT, "--model-uri", model_uri,
                "--host", "127.0.0.1", "--port", str(port), *common]
    if effective_launcher(spec) in ("direct", "fork"):
        return [sys.executable, "-m", "runners.serve", "--model-uri", model_uri,
                "--host", "127.0.0.1", "--port", str(port), *common]
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", spec.env_manager, "-h", "127.0.0.1", "-p", str(port), *common]


def runner_env(pool: PoolSpec, owner: str) -> dict[str, str]:
    env = dict(os.environ)
    # `mlflow models serve` runs `exec uvicorn ...` through bash: the interpreter's own
    # bin/ must come first on PATH or the runner fails with `uvicorn: not found`.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [_PROJECT_ROOT, env.get("PYTHONPATH")] if p)
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
    env.update(pool.extra_env)
    return env


def model_env_vars(env: dict[str, str], python: Path) -> dict[str, str]:
    """A runner's environment for a built model environment: its bin/ first on PATH, no
    gateway venv or source tree on the path, and bytecode saved (PYTHONDONTWRITEBYTECODE
    would make every start recompile the model's libraries: seconds each time)."""
    out = {k: v for k, v in env.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    out["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    return out


def die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: SIGKILL it when the gateway dies."""
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


def kill_group(pid: int, sig: int) -> bool:
    """Signal a runner's whole process group; False if it is already gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


def find_leftovers(owner: str) -> list[int]:
    """Process groups started by an earlier gateway with the same owner id (Linux /proc)."""
    marker = f"{OWNER_ENV}={owner}".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            try:
                found.append(os.getpgid(int(entry.name)))
            except ProcessLookupError:
                continue
    return sorted(set(found))


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
