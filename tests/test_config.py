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
