"""The fork launcher's zygote against real processes: serve, fail, stop, die, memory.

Measurements are printed (run with ``-s`` to see them): time from the spawn request to the
first prediction, and the memory of the zygote and of each forked runner.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from runners.forked import ForkedProcess, Zygote
from runners.launch import LaunchSpec
from runners.zygote import PRELOAD_ENV, ZygoteError, check_single_threaded
from tests.conftest import free_port, owned_processes, wait_for
from tests.registry import IRIS_COLUMNS

pytestmark = pytest.mark.slow

ROW = [5.1, 3.5, 1.4, 0.2]  # a setosa: class 0
MiB = 2**20


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite registry holding ``iris`` v1, logged with a numpy input example."""
    import mlflow
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("zygote-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    X, y = load_iris(return_X_y=True)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy deprecations, MLflow's format advice
            exp = mlflow.create_experiment("zygote", artifact_location=(root / "a").as_uri())
            with mlflow.start_run(experiment_id=exp):
                mlflow.sklearn.log_model(LogisticRegression(max_iter=500).fit(X, y),
                                         name="model", input_example=X[:2],
                                         registered_model_name="iris")
    finally:
        mlflow.set_tracking_uri(previous)
    return uri


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One loop for the module: the shared zygote's tasks live on it between tests."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def base_env() -> dict[str, str]:
    # No tracking URI for the zygote: runners get it in their own env, as an override.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def runner_env(base_env: dict[str, str], tracking_uri: str) -> dict[str, str]:
    return {**base_env, "MLFLOW_TRACKING_URI": tracking_uri}


def report_start(zygote: Zygote, began: float) -> None:
    assert zygote.pid is not None and zygote.ready_seconds is not None
    print(f"\nzygote: ready {time.monotonic() - began:.2f}s after start "
          f"(imports {zygote.ready_seconds:.2f}s); {memory(zygote.pid)}")


@pytest.fixture(scope="module")
def zygote(loop: asyncio.AbstractEventLoop, base_env: dict[str, str]) -> Iterator[Zygote]:
    """One zygote for the module's tests, as the pool keeps one per gateway."""
    began = time.monotonic()
    zygote = Zygote(base_env)
    loop.run_until_complete(zygote.start())
    report_start(zygote, began)
    yield zygote
    loop.run_until_complete(zygote.close())
    assert zygote.pid is not None and not running(zygote.pid)


def launch(model_uri: str, port: int, env: dict[str, str]) -> LaunchSpec:
    return LaunchSpec(label="iris/test", version="1", model_uri=model_uri, port=port,
                      launcher="fork", env=env)


def smaps(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields


def memory(pid: int) -> str:
    m = smaps(pid)
    uss = m["Private_Clean"] + m["Private_Dirty"]
    return f"PSS {m['Pss'] / MiB:.0f} MiB, USS {uss / MiB:.0f} MiB, RSS {m['Rss'] / MiB:.0f} MiB"


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Output:
    """Collects a forked runner's merged output, as Runner does."""

    def __init__(self, proc: ForkedProcess) -> None:
        self.lines: list[str] = []
        self.task = asyncio.create_task(self._read(proc))

    async def _read(self, proc: ForkedProcess) -> None:
        assert proc.stdout is not None
        while raw := await proc.stdout.readline():
            self.lines.append(raw.decode(errors="replace").rstrip())

    def text(self) -> str:
        return "\n".join(self.lines)


async def first_prediction(client: httpx.AsyncClient, proc: ForkedProcess, port: int,
                           out: Output, timeout: float = 60) -> httpx.Response:
    """Poll /ping until 200, then predict one row; fail early if the runner exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.returncode is None, f"runner exited {proc.returncode}:\n{out.text()}"
        try:
            if (await client.get(f"http://127.0.0.1:{port}/ping")).status_code == 200:
                return await client.post(f"http://127.0.0.1:{port}/invocations",
                                         json={"inputs": [ROW]})
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.01)
    raise AssertionError(f"runner not ready after {timeout}s:\n{out.text()}")


async def stop(proc: ForkedProcess) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 15)


def test_forked_runner_serves_predictions(loop: asyncio.AbstractEventLoop, zygote: Zygote,
                                          runner_env: dict[str, str]) -> None:
    async def scenario() -> None:
        port = free_port()
        async with httpx.AsyncClient(timeout=10) as client:
            began = time.monotonic()
            proc = await zygote.fork(launch("models:/iris/1", port, runner_env))
            out = Output(proc)
            try:
                answer = await first_prediction(client, proc, port, out)
                elapsed = time.monotonic() - began
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"predictions": [0]}
                print(f"\nfork: first prediction {elapsed:.2f}s after the spawn request")
                # Its own process group, and a child of the zygote, not of this process.
                assert os.getpgid(proc.pid) == proc.pid
                assert psutil.Process(proc.pid).ppid() == zygote.pid != os.getpid()
                # ps tells which model a forked runner serves, not the zygote's command line
                title = " ".join(psutil.Process(proc.pid).cmdline()).strip()
                assert title == f"model-gateway runner iris/test v1 port {port}", title
                zygote_title = " ".join(psutil.Process(zygote.pid or 0).cmdline()).strip()
                assert zygote_title == "model-gateway zygote"
                print(f"fork: runner {memory(proc.pid)}; zygote {memory(zygote.pid or 0)}")
            finally:
                code = await stop(proc)
        # uvicorn shuts down cleanly on SIGTERM; recent versions then re-raise the signal.
        assert code in (0, -signal.SIGTERM), out.text()
        assert proc.returncode == code and not running(proc.pid)
        await asyncio.wait_for(out.task, 5)  # the output pipe reached EOF
        assert "Application shutdown complete" in out.text()

    loop.run_until_complete(scenario())


def test_each_additional_runner_is_small(loop: asyncio.AbstractEventLoop, zygote: Zygote,
                                         runner_env: dict[str, str]) -> None:
    async def scenario() -> None:
        ports = [free_port(), free_port()]
        procs = [await zygote.fork(launch("models:/iris/1", p, runner_env)) for p in ports]
        outs = [Output(p) for p in procs]
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                for proc, port, out in zip(procs, ports, outs, strict=True):
                    assert (await first_prediction(client, proc, port, out)).status_code == 200
            for proc in procs:
                m = smaps(proc.pid)
                print(f"\nfork: runner {proc.pid} of 2: {memory(proc.pid)}")
                # What one more runner adds: its private pages; the rest is the zygote's.
                assert m["Private_Clean"] + m["Private_Dirty"] < 120 * MiB
        finally:
            for proc in procs:
                await stop(proc)

    loop.run_until_complete(scenario())


def test_bad_model_uri_exits_non_zero_with_mlflow_error(
        loop: asyncio.AbstractEventLoop, zygote: Zygote, runner_env: dict[str, str]) -> None:
    async def scenario() -> None:
        proc = await zygote.fork(launch("models:/no-such-model/1", free_port(), runner_env))
        out = Output(proc)
        code = await asyncio.wait_for(proc.wait(), 60)
        await asyncio.wait_for(out.task, 5)
        assert code == 1, out.text()
        assert "Traceback" in out.text()
        assert "Registered Model with name=no-such-model not found" in out.text(), out.text()
        assert zygote.is_alive  # one runner's failure is not the zygote's

    loop.run_until_complete(scenario())


def test_killing_the_zygote_kills_its_runners(loop: asyncio.AbstractEventLoop,
                                              base_env: dict[str, str],
                                              runner_env: dict[str, str]) -> None:
    doomed = Zygote(base_env)
    began = time.monotonic()
    loop.run_until_complete(doomed.start())
    report_start(doomed, began)

    async def scenario() -> None:
        port = free_port()
        proc = await doomed.fork(launch("models:/iris/1", port, runner_env))
        out = Output(proc)
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await first_prediction(client, proc, port, out)).status_code == 200
        assert doomed.pid is not None
        os.kill(doomed.pid, signal.SIGKILL)
        killed = time.monotonic()
        while running(proc.pid) and time.monotonic() - killed < 2:
            await asyncio.sleep(0.02)
        assert not running(proc.pid), "a forked runner outlived its zygote by 2 s"
        assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
        with pytest.raises(ZygoteError):
            await doomed.fork(launch("models:/iris/1", free_port(), runner_env))

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(doomed.close())


def test_a_zygote_that_cannot_start_is_an_error(loop: asyncio.AbstractEventLoop,
                                                base_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "boom.py").write_text("raise RuntimeError('boom at import')\n")
    path = os.pathsep.join(p for p in (str(tmp_path), base_env.get("PYTHONPATH")) if p)
    broken = Zygote({**base_env, "PYTHONPATH": path, PRELOAD_ENV: "boom"})
    with pytest.raises(ZygoteError, match="boom at import") as failed:
        loop.run_until_complete(broken.start())
    assert "exited during start with code 1" in str(failed.value)
    assert broken.pid is not None and not running(broken.pid)
    loop.run_until_complete(broken.close())


def test_zygote_refuses_to_fork_beside_threads() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="stray")
    thread.start()
    try:
        with pytest.raises(ZygoteError, match="stray"):
            check_single_threaded()
    finally:
        release.set()
        thread.join()
    # This process has asyncio's child-watcher threads; a fresh interpreter has none.
    check = "from runners.zygote import check_single_threaded as c; c()"
    assert subprocess.run([sys.executable, "-c", check], check=False).returncode == 0


def test_a_zygote_starts_again_after_it_died(loop: asyncio.AbstractEventLoop,
                                            base_env: dict[str, str],
                                            runner_env: dict[str, str]) -> None:
    """The supervisor restarts the same Zygote object: a fresh process, new forks work."""
    zygote = Zygote(base_env)

    async def scenario() -> None:
        await zygote.start()
        first = zygote.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert await asyncio.wait_for(zygote.wait(), 10) == -signal.SIGKILL
        assert not zygote.is_alive
        await zygote.start()
        assert zygote.is_alive and zygote.pid != first
        port = free_port()
        proc = await zygote.fork(launch("models:/iris/1", port, runner_env))
        out = Output(proc)
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                assert (await first_prediction(client, proc, port, out)).status_code == 200
        finally:
            await stop(proc)

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(zygote.close())


def test_readiness_waits_for_the_zygote_and_the_models_flavours(start_gateway: Any) -> None:
    """/readyz answers 200 only once the zygote has imported MLflow and what the declared
    models' flavours need (LightGBM here); runners are then forked with it in place."""
    gw = start_gateway([{"name": "lgbm", "alias": "champion"},
                        {"name": "iris", "alias": "champion"}])
    assert wait_for(lambda: gw.client.get("/readyz").status_code == 200, 120, 0.02), gw.log()
    # The zygote logged its readiness before the first 200 (the log is written first).
    ready_line = next(line for line in gw.log().splitlines() if "zygote" in line
                      and "ready in" in line)
    assert "mlflow.lightgbm" in ready_line and "lightgbm" in ready_line, ready_line
    zygote = next(p for p in owned_processes(gw.owner)
                  if "zygote" in " ".join(p.cmdline()))
    maps = Path(f"/proc/{zygote.pid}/maps").read_text()
    assert "lib_lightgbm" in maps
    rows = {"dataframe_split": {"columns": IRIS_COLUMNS, "data": [[5.1, 3.5, 1.4, 0.2]]}}
    answer = gw.predict("lgbm", "champion", rows)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
    runner = psutil.Process(gw.status("lgbm", "champion")["runner"]["pid"])
    assert runner.ppid() == zygote.pid  # forked, with LightGBM already imported
    assert "flavours of" not in gw.log()  # every model's MLmodel was read
