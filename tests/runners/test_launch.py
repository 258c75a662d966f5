"""A runner's launch as data: each launcher's command line, and what a failure says."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from runners.launch import SERVE_SCRIPT, LaunchSpec, effective_launcher, needs_tcp, uses_socket
from runners.runner import Runner
from runners.serve import ServeOptions, main
from runners.spec import EndpointSpec, PoolSpec

SPEC = EndpointSpec(name="churn", alias="champion", model_uri="models:/churn@champion",
                    request_timeout=30)


def launch(launcher: str, **extra: object) -> LaunchSpec:
    values: dict[str, object] = {"label": "churn/champion", "version": "7",
                                 "model_uri": "models:/churn/7", "port": 5001,
                                 "launcher": launcher, "env": {}, "request_timeout": 30.0}
    return LaunchSpec(**{**values, **extra})  # type: ignore[arg-type]


def test_serve_options_survive_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    options = launch("direct", socket="/run/gw/runner-1.sock").serve_options()
    assert options == ServeOptions(model_uri="models:/churn/7", port=5001, timeout=35,
                                   unix_socket="/run/gw/runner-1.sock",
                                   title="model-gateway runner churn/champion v7 port 5001")
    seen: list[ServeOptions] = []
    monkeypatch.setattr("runners.serve.run", lambda o: seen.append(o) or 0)
    assert main(options.argv()) == 0
    assert seen == [options]  # what the direct launcher passes is what the fork one sends
    assert ServeOptions(**asdict(options)) == options


def test_each_launcher_makes_its_own_command() -> None:
    direct = launch("direct").argv()
    assert direct[:3] == [sys.executable, "-m", "runners.serve"]
    assert direct[direct.index("--model-uri") + 1] == "models:/churn/7"
    built = launch("env", python=Path("/envs/abc/bin/python")).argv()
    assert built[:2] == ["/envs/abc/bin/python", SERVE_SCRIPT]  # by path: no gateway package
    cli = launch("cli", env_manager="local", workers=2).argv()
    assert cli[:4] == [sys.executable, "-m", "mlflow", "models"]
    assert cli[cli.index("-m", 2) + 1] == "models:/churn/7"
    assert cli[cli.index("--workers") + 1] == "2" and cli[cli.index("--timeout") + 1] == "35"
    niced = launch("cli", env_manager="local", nice=7).argv()
    assert niced[:4] == ["nice", "-n", "7", sys.executable]
    assert launch("direct", nice=7).serve_options().nice == 7


def test_which_runners_listen_on_a_socket_and_which_on_tcp() -> None:
    pool, with_tcp = PoolSpec(), PoolSpec(runner_tcp=True)
    cli = EndpointSpec(**{**vars(SPEC), "launcher": "cli"})
    workers = EndpointSpec(**{**vars(SPEC), "workers": 2})
    assert effective_launcher(SPEC) == "fork"
    assert effective_launcher(EndpointSpec(**{**vars(SPEC), "env_manager": "uv"})) == "env"
    assert (uses_socket(SPEC, pool), needs_tcp(SPEC, pool)) == (True, False)
    assert (uses_socket(SPEC, with_tcp), needs_tcp(SPEC, with_tcp)) == (True, True)
    assert (uses_socket(cli, pool), needs_tcp(cli, pool)) == (False, True)
    assert (uses_socket(workers, pool), needs_tcp(workers, pool)) == (True, False)
    assert (uses_socket(workers, with_tcp), needs_tcp(workers, with_tcp)) == (False, True)


async def _no_fork(spec: LaunchSpec) -> object:
    raise AssertionError("not started")


def test_a_failure_names_its_cause_even_when_it_scrolled_out_of_the_tail() -> None:
    """`mlflow models serve` prints the runner's traceback, then its own wrapper's: the
    cause is about 27 lines from the end, past the 20 lines a message carries."""
    runner = Runner(SPEC, launch("cli"), _no_fork, model_uri="models:/churn/7")  # type: ignore[arg-type]
    lines = ["Traceback (most recent call last):",
             '  File "/models/churn/loader.py", line 3, in <module>',
             "    import xgboost",
             "ModuleNotFoundError: No module named 'xgboost'",
             *[f"  wrapper frame {i}" for i in range(22)],
             "subprocess.CalledProcessError: Command '['bash', '-c', 'exec uvicorn']' "
             "returned non-zero exit status 1."]
    for line in lines:
        runner.keep_output(line)
    message = runner.failure("runner exited with code 1")
    first, rest = message.split("\n", 1)
    assert first == ("runner exited with code 1 (ModuleNotFoundError: No module named "
                     "'xgboost')")  # what a caller is told; the rest is for the admin API
    assert rest.startswith("last output:\n") and rest.count("\n") == 20
    assert rest.endswith("returned non-zero exit status 1.")
