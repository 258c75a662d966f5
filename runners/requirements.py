"""What a model asks for: its environment request, read from its own files.

Where a model's environment is described (MLflow ≥ 2 writes all three):

- ``MLmodel`` → ``flavors.python_function.env``: ``{conda: conda.yaml, virtualenv:
  python_env.yaml}`` (older models: a conda file name only); ``python_version`` beside it.
- ``python_env.yaml``: ``python: 3.11.7``, ``build_dependencies`` (pip, setuptools,
  wheel pinned to the logging machine's versions) and ``dependencies: [-r requirements.txt]``.
- ``conda.yaml``: ``python=3.11.7`` among conda dependencies, the pip list under ``pip:``.

An environment's key hashes what gets installed (env manager, the model's Python ``X.Y``,
its sorted requirements), so every runner, version and restart whose model asks for the
same thing shares one environment (``runners.environment`` builds it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import EnvBuildError

BUILT_MANAGERS = ("uv", "virtualenv", "conda")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_INCLUDE = re.compile(r"^(-r|--requirement|-c|--constraint)(?:\s+|=)(.+)$")
_CONDA_PYTHON = re.compile(r"^python\s*=?=\s*(\d+\.\d+)")


@dataclass(frozen=True)
class ModelEnv:
    """One model's environment request, read from its files."""

    env_manager: str
    python: str  # major.minor: any local patch release serves it
    install: tuple[str, ...]  # pip/uv arguments in the model's order, relative to its dir
    build: tuple[str, ...]  # python_env.yaml build_dependencies (virtualenv only)
    conda_file: Path | None
    fingerprint: tuple[str, ...]  # sorted, with -r/-c files inlined and local files hashed

    @property
    def key(self) -> str:
        payload = json.dumps([self.env_manager, self.python, self.fingerprint])
        digest = hashlib.sha256(payload.encode()).hexdigest()
        # Readable prefix for whoever lists the cache; the hash alone decides.
        return f"{self.env_manager}-py{self.python}-{digest[:24]}"


def read_model_env(model_dir: Path, env_manager: str) -> ModelEnv:
    """The environment ``model_dir`` (a downloaded MLflow model) asks ``env_manager`` for."""
    if env_manager not in BUILT_MANAGERS:
        raise EnvBuildError(f"env_manager {env_manager!r} builds no environment "
                            f"(one of {', '.join(BUILT_MANAGERS)})")
    model_dir = Path(model_dir)
    flavor = _load_yaml(model_dir / "MLmodel").get("flavors", {}).get("python_function", {})
    env_files = flavor.get("env")
    if isinstance(env_files, dict):
        venv_file, conda_file = env_files.get("virtualenv"), env_files.get("conda")
    else:  # models logged before MLflow 2 name only their conda file
        venv_file, conda_file = None, env_files
    python_env = _load_yaml(model_dir / (venv_file or "python_env.yaml"))
    conda_path = model_dir / (conda_file or "conda.yaml")
    conda = _load_yaml(conda_path)

    python = _major_minor(str(python_env.get("python") or ""))
    python = python or _conda_python(conda) or _major_minor(str(flavor.get("python_version", "")))
    if not python:
        python = f"{sys.version_info.major}.{sys.version_info.minor}"

    if env_manager == "conda":
        if not conda:
            raise EnvBuildError(f"{model_dir}: no conda environment file ({conda_path.name})")
        pip = _conda_pip(conda)
        extra = () if _has_mlflow(pip) else (_mlflow_requirement(),)
        fingerprint = (json.dumps(conda, sort_keys=True), *extra)
        return ModelEnv(env_manager, python, extra, (), conda_path, fingerprint)

    if python_env.get("dependencies"):
        entries = [str(d) for d in python_env["dependencies"]]
    elif (model_dir / "requirements.txt").is_file():
        entries = ["-r requirements.txt"]
    elif conda:
        entries = _conda_pip(conda)
    else:
        raise EnvBuildError(f"{model_dir}: no python_env.yaml, requirements.txt or conda.yaml "
                            "to build an environment from")
    expanded = _expand(entries, model_dir, model_dir)
    if not _has_mlflow(expanded):
        # The runner serves with MLflow's scoring server: a model that does not pin MLflow
        # gets the gateway's own version.
        entries.append(_mlflow_requirement())
        expanded.append(entries[-1])
    build: tuple[str, ...] = tuple(str(d) for d in python_env.get("build_dependencies") or ())
    # uv needs none of pip/setuptools/wheel: leaving them out of uv's key lets versions
    # logged from machines with another pip share one environment.
    requirements: list[str] = sorted(set(expanded)) + ([f"build:{b}" for b in sorted(build)]
                                           if env_manager == "virtualenv" else [])
    install = tuple(arg for entry in entries for arg in _split(entry))
    return ModelEnv(env_manager, python, install, build if env_manager == "virtualenv" else (),
                    None, tuple(requirements))


def environment_key(model_dir: Path, env_manager: str) -> str:
    return read_model_env(model_dir, env_manager).key


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise EnvBuildError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _major_minor(version: str) -> str | None:
    match = re.match(r"^\s*(\d+)\.(\d+)", version)
    return f"{match[1]}.{match[2]}" if match else None


def _conda_python(conda: dict[str, Any]) -> str | None:
    for dep in conda.get("dependencies") or []:
        if isinstance(dep, str) and (match := _CONDA_PYTHON.match(dep.strip())):
            return match[1]
    return None


def _conda_pip(conda: dict[str, Any]) -> list[str]:
    for dep in conda.get("dependencies") or []:
        if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
            return [str(p) for p in dep["pip"]]
    return []


def _expand(lines: list[str], base: Path, model_dir: Path, depth: int = 0) -> list[str]:
    """Requirement lines with ``-r``/``-c`` files inlined and local files hashed, for the key."""
    out: list[str] = []
    for raw in lines:
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        include = _INCLUDE.match(line)
        if include and depth < 10:
            path = (base / include[2].strip()).resolve()
            try:
                nested = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise EnvBuildError(f"{model_dir}: cannot read {include[2].strip()}: "
                                    f"{exc.strerror}") from exc
            prefix = "constraint:" if include[1] in ("-c", "--constraint") else ""
            out += [prefix + n for n in _expand(nested, path.parent, model_dir, depth + 1)]
        elif local := _local_file(base, line):  # e.g. a wheel shipped with the model
            out.append(f"{line} sha256={hashlib.sha256(local.read_bytes()).hexdigest()}")
        else:
            out.append(line)
    return out


def _local_file(base: Path, line: str) -> Path | None:
    if "://" in line or line.startswith("-"):
        return None
    try:
        return base / line if (base / line).is_file() else None
    except OSError:  # a requirement, not a path: e.g. a name too long for one
        return None


def _split(entry: str) -> list[str]:
    """``-r requirements.txt`` → two arguments; a requirement (markers may hold spaces) → one."""
    entry = entry.strip()
    if entry.startswith("-") and " " in entry:
        option, value = entry.split(None, 1)
        return [option, value.strip()]
    return [entry] if entry and not entry.startswith("#") else []


def _has_mlflow(lines: list[str]) -> bool:
    names = {m[1].lower().replace("_", "-") for line in lines if (m := _NAME.match(line))}
    return bool(names & {"mlflow", "mlflow-skinny"})


def _mlflow_requirement() -> str:
    try:
        return f"mlflow=={importlib.metadata.version('mlflow')}"
    except importlib.metadata.PackageNotFoundError:
        return "mlflow"
