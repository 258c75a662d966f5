"""Model environments: built from a model's own requirement files before its runner starts.

An environment lives in ``<env_cache_dir>/<key>/``. The key hashes what gets installed
(env manager, the model's Python ``X.Y``, its sorted requirements), so every runner,
version and restart whose model asks for the same thing reuses one environment, and a
cutover to a version with the same requirements builds nothing.

Environments are built in place, not in a temporary directory renamed afterwards: venvs
and conda prefixes record their own path (``bin/activate``, script shebangs, conda's
prefix rewriting), so a moved one is subtly broken. Instead an environment counts as
built only once its marker file exists; a per-key ``fcntl`` lock keeps two builds of one
key apart (also inside one process), and a build that fails, times out or is cancelled
is removed before the error is raised. A directory without a marker (a build that died
with the gateway) is removed by the next build of its key.

What a model asks for is read by ``runners.requirements``. The gateway process never
imports MLflow: a model is downloaded by a helper process (:func:`download_model`) and
the build runs ``uv``, ``pip`` or ``conda`` as subprocesses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import aiofiles
import aiofiles.os

from .errors import EnvBuildError
from .process import die_with_parent, kill_group
from .requirements import ModelEnv, read_model_env

log = logging.getLogger("model_gateway.environment")

MARKER = "model-gateway-env.json"  # written last: its presence means "fully built"
OUTPUT_LINES = 20
_DOWNLOAD = ("import sys, mlflow.artifacts; "
             "mlflow.artifacts.download_artifacts(sys.argv[1], dst_path=sys.argv[2])")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "model-gateway" / "envs"


# -- subprocesses -------------------------------------------------------------------------
class _Steps:
    """Runs a build's commands under one deadline, each in its own process group."""

    def __init__(self, what: str, deadline: float, env: dict[str, str],
                 on_output: Callable[[str], None] | None) -> None:
        self.what = what
        self.deadline = deadline
        # uv wraps its messages at COLUMNS (set by whatever started the gateway, pytest
        # among them): one verdict per line, so the last line names the cause whole.
        self.env = {**env, "COLUMNS": "100000"}
        self.on_output = on_output
        self.budget = round(max(0.0, deadline - time.monotonic()), 1)
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)

    def error(self, reason: str) -> EnvBuildError:
        """The failure: the reason and the tool's last line (uv's and pip's verdict, e.g.
        which requirement cannot be found) on the first line, what a caller is told; the
        output after it, for the admin API and the log."""
        lines = "\n".join(self.output)
        verdict = self.output[-1].strip(" ×╰─▶│") if self.output else ""
        first = f"{self.what}: {reason}" + (f" ({verdict})" if verdict else "")
        return EnvBuildError(first + (f"\nlast output:\n{lines}" if lines else ""),
                             retry_after=5)

    async def run(self, argv: list[str], cwd: Path | None = None) -> str:
        """Run ``argv`` to completion; its output (also kept in ``output``) is returned."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.error(f"not done within its {self.budget:g}s (startup_timeout)")
        parent = os.getpid()
        preexec = (lambda: die_with_parent(parent)) if sys.platform.startswith("linux") else None
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=preexec)
        except OSError as exc:
            raise self.error(f"cannot run {argv[0]}: {exc.strerror}") from exc
        lines: list[str] = []
        try:
            await asyncio.wait_for(self._pump(proc, lines), remaining)
        except TimeoutError:
            raise self.error(f"not done within its {self.budget:g}s (startup_timeout); "
                             f"stopped `{_short(argv)}`") from None
        finally:
            # Whatever happened, nothing this command started outlives it.
            kill_group(proc.pid, signal.SIGKILL)
            if proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.shield(asyncio.wait_for(proc.wait(), 5))
        if proc.returncode != 0:
            raise self.error(f"`{_short(argv)}` exited with code {proc.returncode}")
        return "\n".join(lines)

    async def _pump(self, proc: asyncio.subprocess.Process, lines: list[str]) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the stream limit; keep reading
                continue
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            if line:
                lines.append(line)
                self.output.append(line)
                if self.on_output is not None:
                    self.on_output(line)
        await proc.wait()


def _short(argv: list[str]) -> str:
    shown = [Path(argv[0]).name, *argv[1:4]]
    return " ".join(shown) + (" …" if len(argv) > 4 else "")


def _build_env(base: Mapping[str, str] | None) -> dict[str, str]:
    env = {**os.environ, **(base or {})}
    # The gateway's own venv and source tree must not leak into the tools that build
    # another environment; bytecode is wanted (see _check_serving).
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX",
                 "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    env.update({"UV_PYTHON_DOWNLOADS": "never", "NO_COLOR": "1", "PIP_NO_INPUT": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _tool(env_manager: str) -> str | None:
    """The uv or conda executable ``env_manager`` needs (virtualenv needs none)."""
    if env_manager == "uv":
        beside = Path(sys.executable).parent / "uv"  # the gateway's venv, activated or not
        found = str(beside) if beside.is_file() else shutil.which("uv")
        if not found:
            raise EnvBuildError("uv is not installed (no `uv` beside the gateway's Python "
                                "nor on PATH); install it with `pip install uv`")
        return found
    if env_manager == "conda":
        found = os.environ.get("CONDA_EXE") or shutil.which("conda")  # CONDA_EXE: conda's own
        if not found:
            raise EnvBuildError("conda is not installed (no `conda` on PATH); use env_manager "
                                "uv or virtualenv, or install conda")
        return found
    return None


async def _find_python(version: str, steps: _Steps, uv: str | None) -> str:
    """A local interpreter for ``version`` (X.Y); never downloads one."""
    if version == f"{sys.version_info.major}.{sys.version_info.minor}":
        return getattr(sys, "_base_executable", None) or sys.executable
    probe = "import sys; print('%d.%d' % sys.version_info[:2], sys.executable)"
    candidates = [p for p in [shutil.which(f"python{version}")] if p]
    if uv:  # also interpreters uv already installed or knows of
        with contextlib.suppress(EnvBuildError):
            found = (await steps.run([uv, "python", "find", "--no-python-downloads", version]))
            candidates += found.splitlines()[-1:]
    for candidate in candidates:
        with contextlib.suppress(EnvBuildError):
            answer = (await steps.run([candidate, "-c", probe])).splitlines()[-1].split(" ", 1)
            if answer[0] == version:
                return answer[1]
    steps.output.clear()  # the failed probes are noise next to this message
    raise EnvBuildError(f"the model needs Python {version}, which is not installed on this "
                        f"machine (the gateway runs {sys.version.split()[0]}); install "
                        f"python{version} — interpreters are never downloaded")


# -- building -----------------------------------------------------------------------------
async def build_environment(model_dir: Path, env_manager: str, cache_dir: Path, *,
                            timeout: float, on_output: Callable[[str], None] | None = None,
                            env: Mapping[str, str] | None = None) -> Path:
    """The python of ``model_dir``'s environment, built first unless the cache has it.

    Waiting for another build of the same key counts toward ``timeout``. Raises
    :class:`EnvBuildError` (a :class:`RunnerStartError`) with the tool's last output lines.
    """
    spec = read_model_env(model_dir, env_manager)
    env_dir = Path(cache_dir) / spec.key
    python = env_dir / "bin" / "python"  # not resolved: the venv's python, not its base
    if _is_built(env_dir, python):
        return python
    tool = _tool(env_manager)  # a missing uv or conda fails before anything is touched
    deadline = time.monotonic() + timeout
    steps = _Steps(f"building the {env_manager} environment {spec.key} for {model_dir}",
                   deadline, _build_env(env), on_output)
    try:
        env_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise steps.error(f"env_cache_dir {env_dir.parent} is not usable: {exc}") from exc
    async with _locked(env_dir.with_name(f".{spec.key}.lock"), steps):
        if _is_built(env_dir, python):  # built by whoever held the lock before us
            return python
        # Left by a gateway that died mid-build (or mid-delete): never reused.
        for stale in [env_dir, *env_dir.parent.glob(f".trash-{spec.key}-*")]:
            await _discard(stale)
        began = time.monotonic()
        try:
            if env_manager == "conda":
                await _build_conda(spec, env_dir, steps, tool or "conda")
            else:
                await _build_venv(spec, Path(model_dir), env_dir, steps, tool)
            await _check_serving(env_dir / "bin" / "python", steps)
            await _write_marker(env_dir, spec, time.monotonic() - began)
            log.info("built the %s environment %s in %.1fs", env_manager, spec.key,
                     time.monotonic() - began)
        except BaseException as exc:
            await _discard(env_dir)
            if isinstance(exc, OSError):  # disk full, permissions: still a clear 503
                raise steps.error(f"cannot write {env_dir}: {exc}") from exc
            raise
    return python


async def _build_venv(spec: ModelEnv, model_dir: Path, env_dir: Path, steps: _Steps,
                     uv: str | None) -> None:
    base = await _find_python(spec.python, steps, uv)
    python = str(env_dir / "bin" / "python")
    if uv:
        await steps.run([uv, "venv", "--no-progress", "--python", base, str(env_dir)])
        # cwd: `-r requirements.txt` and shipped wheels are relative to the model's dir.
        await steps.run([uv, "pip", "install", "--no-progress", "--python", python,
                         *spec.install], cwd=model_dir)
        return
    await steps.run([base, "-m", "venv", str(env_dir)])
    pip = [python, "-m", "pip", "install", "--progress-bar", "off"]
    if spec.build:
        await steps.run([*pip, *spec.build], cwd=model_dir)
    await steps.run([*pip, *spec.install], cwd=model_dir)


async def _build_conda(spec: ModelEnv, env_dir: Path, steps: _Steps, conda: str) -> None:
    assert spec.conda_file is not None
    await steps.run([conda, "env", "create", "--quiet", "--prefix", str(env_dir),
                     "--file", str(spec.conda_file)])
    if spec.install:  # MLflow, when the model's pip list lacks it
        await steps.run([str(env_dir / "bin" / "python"), "-m", "pip", "install",
                         *spec.install])


async def _check_serving(python: Path, steps: _Steps) -> None:
    """Import what a runner imports first, so a model whose pins cannot serve fails here.

    It also saves the bytecode of MLflow's serving stack: uv installs without it, and a
    runner started with PYTHONDONTWRITEBYTECODE would otherwise compile it on every start
    (about 5 s here). Compiling everything at install (``--compile-bytecode``) costs ~20 s.
    """
    try:
        await steps.run([str(python), "-c", "import mlflow.pyfunc.scoring_server, uvicorn"])
    except EnvBuildError as exc:
        raise EnvBuildError(f"the environment cannot run MLflow's scoring server: {exc}",
                            retry_after=exc.retry_after) from exc


def _is_built(env_dir: Path, python: Path) -> bool:
    marker = env_dir / MARKER
    # exists() follows the venv's symlink: an environment whose base interpreter was
    # removed since is rebuilt rather than handed to a runner that cannot start.
    if not (marker.is_file() and python.exists()):
        return False
    with contextlib.suppress(OSError):
        os.utime(marker)  # last use, for whoever prunes the cache
    return True


async def _write_marker(env_dir: Path, spec: ModelEnv, seconds: float) -> None:
    info = {"key": spec.key, "env_manager": spec.env_manager, "python": spec.python,
            "requirements": list(spec.fingerprint), "build_seconds": round(seconds, 1),
            "built_at": time.time()}
    tmp = env_dir / f".{MARKER}.tmp"
    async with aiofiles.open(tmp, "w", encoding="utf-8") as fh:
        await fh.write(json.dumps(info, indent=1))
    await aiofiles.os.replace(tmp, env_dir / MARKER)


async def _discard(path: Path) -> None:
    """Remove a directory: renamed away at once (no half environment is ever visible
    under its key), deleted in a thread (hundreds of MB would block the event loop)."""
    trash = path
    if not path.name.startswith(".trash-"):
        trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            path.rename(trash)
        except FileNotFoundError:
            return
    await asyncio.shield(asyncio.to_thread(shutil.rmtree, trash, True))


@contextlib.asynccontextmanager
async def _locked(path: Path, steps: _Steps) -> AsyncIterator[None]:
    """An exclusive ``flock`` on ``path``, polled so the wait honours the deadline.

    flock locks belong to an open file description, so two builds inside one gateway
    exclude each other as two gateways sharing a cache directory do.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise steps.error(f"cannot open the lock file {path}: {exc}") from exc
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= steps.deadline:
                    raise steps.error("timed out waiting for another build of the same "
                                      "environment") from None
                await asyncio.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock too


# -- downloading --------------------------------------------------------------------------
async def download_model(uri: str, models_dir: Path, *, timeout: float,
                         env: Mapping[str, str] | None = None,
                         on_output: Callable[[str], None] | None = None) -> Path:
    """A local copy of ``uri`` under ``models_dir``, downloaded once by a helper process.

    Pass a pinned URI (``models:/name/3``, ``runs:/…``): the copy is reused by URI.
    ``env`` carries ``MLFLOW_TRACKING_URI`` and friends. Plain files, unlike an
    environment, move freely: the download lands in a temporary directory renamed last.
    """
    if Path(uri).is_dir():  # already local: nothing to copy
        return Path(uri)
    dest = Path(models_dir) / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if (dest / "MLmodel").is_file():
        return dest
    tmp = dest.with_name(f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise EnvBuildError(f"downloading {uri}: cannot write {dest.parent}: {exc}") from exc
    steps = _Steps(f"downloading {uri}", time.monotonic() + timeout,
                   {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, on_output)
    try:
        await steps.run([sys.executable, "-c", _DOWNLOAD, uri, str(tmp)])
        if not (tmp / "MLmodel").is_file():
            raise steps.error("the downloaded artifacts have no MLmodel file")
        try:
            tmp.rename(dest)
        except OSError as exc:  # a concurrent download of the same URI won the rename
            if not (dest / "MLmodel").is_file():
                raise steps.error(f"cannot move it to {dest}: {exc}") from exc
    finally:
        await _discard(tmp)
    return dest


async def prepare_environment(uri: str, env_manager: str, cache_dir: Path, *,
                              deadline: float, env: Mapping[str, str],
                              on_output: Callable[[str], None] | None = None
                              ) -> tuple[Path, Path]:
    """Download ``uri`` and build (or reuse) its environment: (python, model dir). Both
    count toward ``deadline`` (a monotonic time)."""
    model_dir = await download_model(uri, cache_dir / "models", env=env,
                                     timeout=max(0.0, deadline - time.monotonic()))
    python = await build_environment(model_dir, env_manager, cache_dir, env=env,
                                     timeout=max(0.0, deadline - time.monotonic()),
                                     on_output=on_output)
    return python, model_dir
