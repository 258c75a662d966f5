"""Config files: every error names its key path, and a bad file starts nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config
from gateway.config_types import parse_duration
from tests.conftest import ROOT

BAD = """
tracking_uri: ${GATEWAY_TEST_UNSET_VAR}
pool: {max_runners: 0, idle_timeout: 10m}
defaults: {env_manager: pip}
endpoints:
  - {name: iris, alias: champion}
  - {name: diabetes, alias: prod, workers: 0, colour: blue}
  - {name: iris, alias: champion, startup_timeout: soon}
  - {name: "a/b", alias: x}
  - {alias: y}
"""


def test_every_error_is_named_by_its_key_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BAD, env={})
    assert set(err.value.errors) == {
        "tracking_uri: environment variable GATEWAY_TEST_UNSET_VAR is not set and has no default",
        "pool.max_runners: must be ≥ 1",
        "defaults.env_manager: must be one of 'local', 'virtualenv', 'uv' or 'conda'",
        "endpoints[1].workers: must be ≥ 1",
        "endpoints[1].colour: unknown key",
        "endpoints[2]: duplicate endpoint iris/champion (first declared at endpoints[0])",
        "endpoints[2].startup_timeout: must be a duration such as 90, 90s, 5m or 1h, not 'soon'",
        "endpoints[3].name: must not contain '/' or ':'",
        "endpoints[4].name: required",
    }


def test_defaults_are_inherited_and_env_expanded() -> None:
    config = parse_config("""
tracking_uri: ${TRACKING:-sqlite:///x.db}
server: {port: "${PORT}"}
defaults: {workers: 2, request_timeout: 90, drain_timeout: 1h, startup_timeout: 500ms}
endpoints:
  - {name: iris, alias: champion}
  - {name: diabetes, alias: prod, model_uri: models:/diabetes/Production, workers: 3}
  - {name: my model.v2, alias: a b}
""", env={"PORT": "9000"})
    assert config.tracking_uri == "sqlite:///x.db"
    assert config.server.port == 9000
    iris, diabetes, spaced = config.endpoint_specs()
    assert (iris.model_uri, iris.workers, iris.request_timeout) == ("models:/iris@champion", 2, 90)
    assert (iris.drain_timeout, iris.startup_timeout) == (3600, 0.5)
    assert (diabetes.model_uri, diabetes.workers) == ("models:/diabetes/Production", 3)
    assert spaced.model_uri == "models:/my model.v2@a b"


@pytest.mark.parametrize(("text", "seconds"), [(90, 90), ("90", 90), ("90s", 90), ("5m", 300),
                                               ("1h", 3600), ("1.5m", 90), ("250ms", 0.25)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-1", "5x", "m", "", "1d", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_not_yaml_or_not_a_mapping(tmp_path: Path) -> None:
    for text, message in [("x: [", "not valid YAML"), ("- a\n- b", "must be a mapping")]:
        with pytest.raises(ConfigError) as err:
            parse_config(text)
        assert message in err.value.errors[0]
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read" in err.value.errors[0]


def test_demo_and_example_configs_are_valid() -> None:
    for name in ("gateway.yaml", "example.yaml"):
        config = load_config(ROOT / "config" / name, env={})
        assert config.endpoints, name


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60)


def test_check_config_cli(tmp_path: Path) -> None:
    good = _cli("check-config", str(ROOT / "config" / "gateway.yaml"))
    assert good.returncode == 0, good.stderr
    assert '"model_uri": "models:/diabetes/Production"' in good.stdout
    every_key = _cli("check-config", str(ROOT / "config" / "example.yaml"))
    assert every_key.returncode == 0, every_key.stderr
    assert '"max_batch_size": 32' in every_key.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    out = _cli("check-config", str(bad))
    assert out.returncode == 2
    assert "endpoints[1].workers: must be ≥ 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_with_bad_config_exits_nonzero_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    out = _cli("serve", "--config", str(bad))
    assert out.returncode == 2
    assert "pool.max_runners: must be ≥ 1" in out.stderr
    assert "Uvicorn running" not in out.stderr and "Traceback" not in out.stderr


def test_rollouts_take_defaults_and_bad_ones_are_refused_with_key_paths() -> None:
    config = parse_config("""
defaults:
  rollout: {steps: [10, 50, 100], step_time: 3m, max_error_rate: 1%, min_requests: 50}
endpoints:
  - {name: churn, alias: champion}
  - {name: churn, alias: challenger, rollout: false}
  - {name: churn, alias: canary, rollout: {steps: ["5%", 100], sticky: X-Customer-Id}}
""", env={})
    specs = {s.alias: s.rollout for s in config.endpoint_specs()}
    champion = specs["champion"]
    assert champion is not None and champion.steps == (10, 50, 100)
    assert (champion.step_time, champion.max_error_rate, champion.max_latency_ratio) == \
        (180.0, 0.01, 2.0)
    assert specs["challenger"] is None
    canary = specs["canary"]
    assert canary is not None and canary.steps == (5, 100) and canary.sticky == "X-Customer-Id"
    assert canary.step_time == 120.0, "an endpoint's own rollout replaces the defaults' whole"
    with pytest.raises(ConfigError) as err:
        parse_config("""
endpoints:
  - {name: a, alias: b, rollout: {steps: [50, 10]}}
  - {name: a, alias: c, rollout: {steps: [0, 100], max_error_rate: 120%}}
  - {name: a, alias: d, rollout: {max_latency_ratio: 0.5, min_requests: 0, step_time: soon}}
  - {name: a, alias: e, rollout: {stepz: 1}}
""", env={})
    assert err.value.errors == [
        "endpoints[0].rollout.steps: steps must go up, such as [10, 50, 100]",
        "endpoints[1].rollout.steps: each step is a percent of traffic: more than 0, at most 100",
        "endpoints[1].rollout.max_error_rate: must be ≤ 100.0",
        "endpoints[2].rollout.step_time: must be a duration such as 90, 90s, 5m or 1h, "
        "not 'soon'",
        "endpoints[2].rollout.max_latency_ratio: must be ≥ 1.0",
        "endpoints[2].rollout.min_requests: must be ≥ 1",
        "endpoints[3].rollout.stepz: unknown key",
    ]
    with pytest.raises(ConfigError) as err:
        parse_config("endpoints:\n  - {name: a, alias: b}\n"
                     "  - {name: a, alias: live, traffic: {b: 1}, rollout: {}}\n", env={})
    assert err.value.errors == [
        "endpoints[1].rollout: a routing endpoint (traffic) has no runner; set it on its arms"]
