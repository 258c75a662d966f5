"""The Anaconda project command: ``anaconda-project.yml`` declares what ADSP needs, and its
``serve`` command, run with the HTTP options ADSP passes, serves a real model under the
deployment's url prefix. (``anaconda-project`` itself is not installable here: the test
runs the command line the file declares, as anaconda-project would.)"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port, owned_processes, wait_for
from tests.registry import Registry

PROJECT = ROOT / "anaconda-project.yml"
X = {"dataframe_split": {"columns": ["x"], "data": [[0.5]]}}


def project() -> dict[str, Any]:
    return yaml.safe_load(PROJECT.read_text())


def test_the_project_file_declares_what_adsp_needs() -> None:
    spec = project()
    assert spec["name"] == "mlflow-model-gateway"
    serve = spec["commands"]["serve"]
    assert serve["supports_http_options"] is True  # ADSP passes its HTTP options
    assert shlex.split(serve["unix"])[:2] == ["model-gateway", "serve"]
    for command in spec["commands"].values():
        assert command.get("env_spec", "default") in spec["env_specs"]
    packages = spec["env_specs"]["default"]["packages"]
    assert "python=3.11" in packages
    pip = next(p["pip"] for p in packages if isinstance(p, dict))
    pinned = re.search(r'"(mlflow==[^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned and pinned.group(1) in pip  # the MLflow the suite runs on
    assert "." in pip  # the gateway itself, from the project directory
    variables = spec["variables"]
    assert (ROOT / variables["MODEL_GATEWAY_CONFIG"]["default"]).is_file()
    assert "default" not in variables["MLFLOW_TRACKING_URI"]  # asked for, never guessed
    done = subprocess.run([sys.executable, "-m", "gateway", "check-config",
                           variables["MODEL_GATEWAY_CONFIG"]["default"]],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_serve_with_adsp_http_options_serves_under_the_url_prefix(
        tmp_path: Path, registry: Registry) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "tracking_uri": registry.tracking_uri,
        "endpoints": [{"name": "const", "alias": "live"}]}))
    port = free_port()
    argv = shlex.split(project()["commands"]["serve"]["unix"])
    argv[0] = str(Path(sys.executable).parent / argv[0])  # the venv's console script
    argv += ["--anaconda-project-host", "gw.adsp.example",
             "--anaconda-project-host", "localhost",
             "--anaconda-project-address", "127.0.0.1",
             "--anaconda-project-port", str(port),
             "--anaconda-project-url-prefix", "/deploy/abc123",
             "--anaconda-project-no-browser",
             "--anaconda-project-iframe-hosts", "https://adsp.example",
             "--anaconda-project-use-xheaders"]
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MODEL_GATEWAY_CONFIG": str(config)},
                            start_new_session=True)
    owner = f"gateway@127.0.0.1:{port}"
    base = f"http://127.0.0.1:{port}/deploy/abc123"
    try:
        with httpx.Client(timeout=60) as client:
            def up() -> bool:
                try:
                    return client.get(f"{base}/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            assert wait_for(up, 30), (tmp_path / "gateway.log").read_text()
            for _ in range(3):
                answer = client.post(f"{base}/models/const/live/invocations", json=X)
                assert answer.status_code == 200 and answer.json() == {"predictions": [1.0]}
            assert client.get(f"{base}/models/const/live").json()["state"] == "ready"
            assert "model_gateway_requests_total" in client.get(f"{base}/metrics").text
            assert client.get(f"{base}/").status_code == 200  # the status page
            assert client.get(f"{base}/status/data").json()["endpoints"][0]["version"] == "1"
            outside = client.post(f"http://127.0.0.1:{port}/models/const/live/invocations",
                                  json=X)
            assert outside.status_code == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert wait_for(lambda: owned_processes(owner) == [], 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
