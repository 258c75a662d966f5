"""Model environments built with uv (and pip) from a real registry's models.

The model answers every row with ``sklearn.__version__`` as its runner sees it: a
prediction of ``1.8.0`` proves the runner ran in the model's environment, not the
gateway's (scikit-learn 1.9.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx
import psutil
import pytest
import sklearn

from runners.environment import EnvBuildError, build_environment, download_model
from runners.requirements import environment_key, read_model_env
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

GATEWAY_SKLEARN = "1.9.1"
OTHER_SKLEARN = "1.8.0"  # another minor release that PyPI serves for Python 3.11

SERVE = ROOT / "runners" / "serve.py"

MODEL_CODE = '''
import mlflow.pyfunc
import pandas as pd
import sklearn


class SklearnVersion(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        return [sklearn.__version__] * len(model_input)


mlflow.models.set_model(SklearnVersion())
'''


def log_versions(root: Path, sklearn_versions: Sequence[str]) -> str:
    """A sqlite registry in ``root`` whose model ``skver`` has one version per entry, each
    requiring that scikit-learn (and, as MLflow adds it, this MLflow); its tracking URI."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    code = root / "sklearn_version.py"
    code.write_text(MODEL_CODE)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecations inside MLflow's sqlite store
            exp = MlflowClient(uri).create_experiment("env", (root / "artifacts").as_uri())
            for sk in sklearn_versions:
                with mlflow.start_run(experiment_id=exp):
                    mlflow.pyfunc.log_model(name="model", python_model=str(code),
                                            pip_requirements=[f"scikit-learn=={sk}"],
                                            input_example=pd.DataFrame({"x": [1.0]}),
                                            registered_model_name="skver")
    finally:
        mlflow.set_tracking_uri(previous)
    return uri


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Versions 1 and 3 need the gateway's scikit-learn, version 2 another one; each is
    downloaded from the registry by the gateway's helper process."""
    root = tmp_path_factory.mktemp("env-registry")
    uri = log_versions(root, (GATEWAY_SKLEARN, OTHER_SKLEARN, GATEWAY_SKLEARN))

    async def download_all() -> list[Path]:
        return list(await asyncio.gather(*(
            download_model(f"models:/skver/{v}", root / "models", timeout=120,
                           env={"MLFLOW_TRACKING_URI": uri}) for v in (1, 2, 3))))

    return dict(zip((1, 2, 3), asyncio.run(download_all()), strict=True))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("envs")


def build(model: Path, cache: Path, manager: str = "uv", timeout: float = 300,
          output: list[str] | None = None) -> Path:
    return asyncio.run(build_environment(model, manager, cache, timeout=timeout,
                                         on_output=None if output is None else output.append))


def variant(model: Path, tmp_path: Path, requirements: str | None = None,
            python: str | None = None) -> Path:
    """A copy of a downloaded model with its requirements or its Python changed."""
    copy = tmp_path / f"model-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(model, copy)
    if requirements is not None:
        (copy / "requirements.txt").write_text(requirements)
    if python is not None:
        env_file = copy / "python_env.yaml"
        env_file.write_text(env_file.read_text().replace("python: 3.11", f"python: {python}"))
    return copy


def leftovers(cache: Path) -> list[str]:
    """Environment or trash directories in the cache (lock files are fine)."""
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def building_processes(cache: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if str(cache) in " ".join(p.info["cmdline"] or [])]


def test_key_follows_requirements_not_versions(models: dict[int, Path]) -> None:
    assert environment_key(models[1], "uv") == environment_key(models[3], "uv")
    assert environment_key(models[1], "uv") != environment_key(models[2], "uv")
    assert environment_key(models[1], "uv") != environment_key(models[1], "virtualenv")
    spec = read_model_env(models[2], "uv")
    assert spec.python == "3.11"  # python_env.yaml holds 3.11.x: any local 3.11 serves it
    assert f"scikit-learn=={OTHER_SKLEARN}" in spec.fingerprint
    assert "mlflow==3.17.2" in spec.fingerprint  # MLflow pins itself when logging


def test_built_once_then_reused(models: dict[int, Path], cache: Path) -> None:
    python = build(models[1], cache)
    assert python.parent.parent.name == environment_key(models[1], "uv")
    marker = json.loads((python.parent.parent / "model-gateway-env.json").read_text())
    assert f"scikit-learn=={GATEWAY_SKLEARN}" in marker["requirements"]
    before = leftovers(cache)

    began = time.monotonic()
    output: list[str] = []
    assert build(models[3], cache, output=output) == python  # another version, same needs
    assert time.monotonic() - began < 2
    assert output == []  # nothing ran
    assert leftovers(cache) == before


def test_runners_serve_from_their_own_environments(models: dict[int, Path],
                                                   cache: Path) -> None:
    envs = {v: build(models[v], cache) for v in (1, 2)}
    assert envs[1] != envs[2]
    assert OTHER_SKLEARN != sklearn.__version__ == GATEWAY_SKLEARN

    runners = {v: start_runner(envs[v], models[v]) for v in (1, 2)}
    try:
        answers = {v: predict(*runner) for v, runner in runners.items()}
    finally:
        for proc, _, output in runners.values():
            stop(proc)
            output.close()
    assert answers == {1: [GATEWAY_SKLEARN], 2: [OTHER_SKLEARN]}


def start_runner(python: Path, model: Path) -> tuple[subprocess.Popen[bytes], int, IO[bytes]]:
    """The runner as the gateway starts it for a built environment: serve.py by path."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # A file, not a pipe nobody reads: a chatty runner must not block on a full pipe.
    output = tempfile.TemporaryFile()
    proc = subprocess.Popen([str(python), str(SERVE), "--model-uri", str(model),
                             "--port", str(port)], env=env, stdout=output,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port, output


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone: nothing to kill
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def predict(proc: subprocess.Popen[bytes], port: int, output: IO[bytes]) -> list[str]:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        stop(proc)
        output.seek(0)
        pytest.fail(f"runner never answered /ping:\n{output.read().decode()[-3000:]}")
    resp = httpx.post(f"{url}/invocations", timeout=30,
                      json={"dataframe_split": {"columns": ["x"], "data": [[1.0]]}})
    assert resp.status_code == 200, resp.text
    return resp.json()["predictions"]


def test_concurrent_builds_of_one_key_build_once(models: dict[int, Path], cache: Path,
                                                 tmp_path: Path) -> None:
    model = variant(models[1], tmp_path, f"mlflow==3.17.2\nscikit-learn=={GATEWAY_SKLEARN}\n"
                                         "threadpoolctl>=3\n")
    outputs: tuple[list[str], list[str]] = ([], [])

    async def both() -> list[Path]:
        return list(await asyncio.gather(*(
            build_environment(model, "uv", cache, timeout=300, on_output=out.append)
            for out in outputs)))

    first, second = asyncio.run(both())
    assert first == second
    assert sorted(bool(out) for out in outputs) == [False, True]  # one built, one waited


def test_unresolvable_requirement_fails_clearly(models: dict[int, Path],
                                                tmp_path: Path) -> None:
    cache = tmp_path / "envs"
    model = variant(models[1], tmp_path, "mlflow==3.17.2\nscikit-learn==0.0.0\n")
    began = time.monotonic()
    with pytest.raises(EnvBuildError) as err:
        build(model, cache, timeout=120)
    assert time.monotonic() - began < 120
    message = str(err.value)
    assert "uv pip install" in message and "exited with code" in message
    assert "scikit-learn==0.0.0" in message and "unsatisfiable" in message  # uv's own words
    assert leftovers(cache) == []  # no half environment, no trash


def test_build_past_its_timeout_is_killed_and_removed(models: dict[int, Path],
                                                      tmp_path: Path) -> None:
    cache = tmp_path / "envs"
    model = variant(models[1], tmp_path, "mlflow==3.17.2\njoblib>=1\n")
    began = time.monotonic()
    with pytest.raises(EnvBuildError, match=r"not done within its 1s \(startup_timeout\)"):
        build(model, cache, timeout=1)
    assert time.monotonic() - began < 10
    assert leftovers(cache) == []
    assert building_processes(cache) == []


def test_cancelled_build_leaves_nothing(models: dict[int, Path], tmp_path: Path) -> None:
    """The gateway shutting down mid-build: the build's processes and directory go."""
    cache = tmp_path / "envs"
    model = variant(models[1], tmp_path, "mlflow==3.17.2\nthreadpoolctl>=2\n")
    seen: list[str] = []

    async def cancel_midway() -> None:
        task = asyncio.create_task(build_environment(model, "uv", cache, timeout=300,
                                                     on_output=seen.append))
        while not any("Using Python" in line for line in seen):  # uv pip install began
            assert not task.done(), seen
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert leftovers(cache) == []
    assert building_processes(cache) == []


def test_python_version_not_installed_is_named(models: dict[int, Path], tmp_path: Path) -> None:
    model = variant(models[1], tmp_path, python="3.99")
    with pytest.raises(EnvBuildError, match=r"the model needs Python 3\.99, which is not "
                                            r"installed on this machine"):
        build(model, tmp_path / "envs", timeout=60)
    assert leftovers(tmp_path / "envs") == []


@pytest.mark.skipif(bool(shutil.which("conda") or os.environ.get("CONDA_EXE")),
                    reason="conda is installed here")
def test_conda_missing_is_a_clear_error(models: dict[int, Path], tmp_path: Path) -> None:
    with pytest.raises(EnvBuildError, match="conda is not installed"):
        build(models[1], tmp_path / "envs", "conda", timeout=60)
    assert not (tmp_path / "envs").exists()  # refused before touching the cache


def test_failed_download_names_the_uri(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(EnvBuildError, match=r"downloading models:/nope/1: .*exited with code"):
        asyncio.run(download_model("models:/nope/1", tmp_path / "models", timeout=120,
                                   env={"MLFLOW_TRACKING_URI": uri}))
    assert list((tmp_path / "models").iterdir()) == []


def test_virtualenv_builds_with_pip(models: dict[int, Path], cache: Path) -> None:
    python = build(models[2], cache, "virtualenv", timeout=600)
    assert python != build(models[2], cache)  # another manager, another environment
    found = subprocess.run([str(python), "-c", "import sklearn; print(sklearn.__version__)"],
                           capture_output=True, text=True, timeout=120, check=True)
    assert found.stdout.strip() == OTHER_SKLEARN
