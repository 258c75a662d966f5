"""Every client's language against one real gateway: the Open Inference Protocol through
tritonclient, the OpenAPI document (openapi-spec-validator, schemathesis) and the
``mlflow deployments`` target through MLflow's own CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from openapi_spec_validator import validate
from tritonclient.utils import InferenceServerException

from tests.conftest import ADMIN_TOKEN, GatewayProcess, wait_for
from tests.registry import IRIS_COLUMNS, Registry

pytestmark = pytest.mark.slow

KEY = "v2-api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
EXPECTED = [0, 2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def gw(registry: Registry, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("v2")
    config = {"tracking_uri": registry.tracking_uri, "state_dir": str(workdir / "state"),
              "auth": {"admin_tokens": [ADMIN_TOKEN], "api_keys": [KEY]},
              "defaults": {"startup_timeout": "2m"},
              "endpoints": [
                  {"name": "iris", "alias": "champion", "default": True},
                  {"name": "iris", "alias": "pinned", "model_uri": "models:/iris/1"},
                  {"name": "const", "alias": "live", "public": True}]}
    gateway = GatewayProcess(config, workdir)
    assert wait_for(lambda: gateway.client.get("/readyz").status_code == 200, 90), gateway.log()
    yield gateway
    log = gateway.log()
    assert gateway.stop() == 0, log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(url=gw.url.removeprefix("http://"),
                                              network_timeout=120.0)
    yield connection
    connection.close()


def iris_inputs(rows: list[list[float]], datatype: str = "FP64") -> list[triton.InferInput]:
    inputs = []
    for i, column in enumerate(IRIS_COLUMNS):
        tensor = triton.InferInput(column, [len(rows)], datatype)
        tensor.set_data_from_numpy(np.array([r[i] for r in rows], dtype=np.float64),
                                   binary_data=False)
        inputs.append(tensor)
    return inputs


def test_tritonclient_metadata_ready_and_inference(gw: GatewayProcess,
                                                  client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "mlflow-model-gateway"
    meta = client.get_model_metadata("iris", headers={**AUTH})
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": c, "datatype": "FP64", "shape": [-1]}
                              for c in IRIS_COLUMNS]
    assert meta["outputs"] == [{"name": "output-0", "datatype": "INT64", "shape": [-1]}]
    assert client.is_model_ready("iris", "pinned", headers={**AUTH})
    answer = client.infer("iris", iris_inputs(ROWS), model_version="champion", headers={**AUTH},
                          outputs=[triton.InferRequestedOutput("output-0", binary_data=False)],
                          request_id="req-1")
    assert answer.as_numpy("output-0").tolist() == EXPECTED
    result = answer.get_response()
    assert result["model_name"] == "iris" and result["model_version"] == "1"
    assert result["id"] == "req-1"
    # Without a version: the endpoint marked default (champion); the same as /invocations.
    default = client.infer("iris", iris_inputs(ROWS), headers={**AUTH})
    assert default.as_numpy("output-0").tolist() == EXPECTED
    mlflow = gw.predict("iris", "champion", {"dataframe_split": {"columns": IRIS_COLUMNS,
                                                                 "data": ROWS}}, headers={**AUTH})
    assert mlflow.json()["predictions"] == EXPECTED
    # One endpoint for the name: no version needed; public: no key needed.
    const = triton.InferInput("x", [3, 1], "INT64")
    const.set_data_from_numpy(np.array([[1], [2], [3]], dtype=np.int64), binary_data=False)
    assert client.infer("const", [const]).as_numpy("output-0").tolist() == [1.0, 1.0, 1.0]
    status = gw.status("iris", "champion")
    assert status["state"] == "ready" and status["version"] == "1"


def test_what_does_not_fit_the_signature_is_a_clear_400(
        client: triton.InferenceServerClient) -> None:
    wrong_type = iris_inputs(ROWS)
    wrong_type[0] = triton.InferInput("sepal_length", [2], "BYTES")
    wrong_type[0].set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_),
                                      binary_data=False)
    with pytest.raises(InferenceServerException) as err:
        client.infer("iris", wrong_type, headers={**AUTH})
    assert err.value.status() == "400"
    assert "input 'sepal_length': datatype BYTES does not fit the signature's FP64" in \
        err.value.message()
    wrong_shape = iris_inputs(ROWS)
    wrong_shape[1] = triton.InferInput("sepal_width", [2, 2], "FP64")
    wrong_shape[1].set_data_from_numpy(np.ones((2, 2)), binary_data=False)
    with pytest.raises(InferenceServerException) as err:
        client.infer("iris", wrong_shape, headers={**AUTH})
    assert err.value.status() == "400" and "does not fit a column" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("iris", iris_inputs(ROWS))  # no api key
    assert err.value.status() == "401"
    # Binary outputs (Triton's extension) are answered as JSON, which its client reads too.
    binary = client.infer("iris", iris_inputs(ROWS), headers={**AUTH},
                          outputs=[triton.InferRequestedOutput("output-0", binary_data=True)])
    assert binary.as_numpy("output-0").tolist() == EXPECTED
    # Binary inputs are not: a clear 400.
    tensors = iris_inputs(ROWS)
    tensors[0].set_data_from_numpy(np.array([5.1, 6.7]), binary_data=True)
    with pytest.raises(InferenceServerException) as err:
        client.infer("iris", tensors, headers={**AUTH})
    assert err.value.status() == "400" and "binary tensor data" in err.value.message()


def test_plain_and_unusual_requests_are_answered_alike(gw: GatewayProcess) -> None:
    """The direct path translates plain requests in one pass (v2_fast) and the rest with
    the general codec: the answers are the same, and those of /invocations."""
    def column(name: str, data: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
        return {"name": name, "datatype": "FP64", "shape": shape or [2], "data": data}

    plain = [column(c, [r[i] for r in ROWS]) for i, c in enumerate(IRIS_COLUMNS)]
    as_rows = [column(c, [[r[i]] for r in ROWS], [2, 1]) for i, c in enumerate(IRIS_COLUMNS)]
    requests = [{"inputs": plain}, {"inputs": as_rows},
                {"inputs": plain, "id": "r-2", "outputs": [{"name": "output-0"}],
                 "parameters": {"binary_data_output": False}},
                {"inputs": [{**plain[0], "data": [5, 7]}, *plain[1:]]},  # ints: as floats
                {"inputs": plain, "id": "r-3"}]
    answers = [gw.client.post("/v2/models/iris/versions/champion/infer", json=r,
                              headers={**AUTH}) for r in requests]
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    output = {"name": "output-0", "datatype": "INT64", "shape": [2], "data": EXPECTED}
    assert answers[0].json() == {"model_name": "iris", "model_version": "1",
                                 "outputs": [output]}
    assert answers[1].json() == answers[0].json()
    assert answers[2].json() == {**answers[0].json(), "id": "r-2"}
    assert answers[3].json()["outputs"][0]["shape"] == [2]
    assert answers[4].json() == {**answers[0].json(), "id": "r-3"}
    unknown = gw.client.post("/v2/models/iris/versions/champion/infer", headers={**AUTH},
                             json={"inputs": [*plain, column("colour", [1.0, 2.0])]})
    assert unknown.status_code == 400
    assert unknown.json() == {"error": "input 'colour' is not in the model's signature "
                                       f"(inputs: {', '.join(IRIS_COLUMNS)})"}
    # An output the model does not have is the caller's mistake, on every path.
    for _ in range(3):  # the first may take the ASGI path, the next the direct one
        nope = gw.client.post("/v2/models/iris/versions/champion/infer", headers={**AUTH},
                              json={"inputs": plain, "outputs": [{"name": "nope"}]})
        assert nope.status_code == 400, nope.text
        assert nope.json()["error"].startswith("unknown outputs: nope")


def test_the_openapi_document_is_valid_and_schemathesis_finds_nothing(
        gw: GatewayProcess, tmp_path: Path) -> None:
    doc = gw.client.get("/openapi.json", headers={**AUTH}).json()
    validate(doc)
    iris = doc["paths"]["/models/iris/champion/invocations"]["post"]
    example = iris["requestBody"]["content"]["application/json"]["example"]
    assert example["dataframe_split"]["columns"] == IRIS_COLUMNS  # the model's input_example
    answer = gw.client.post("/models/iris/champion/invocations", json=example, headers={**AUTH})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
    # Without a key, only what may be called without one.
    public = gw.client.get("/openapi.json").json()["paths"]
    assert "/models/const/live/invocations" in public
    assert "/models/iris/champion/invocations" not in public
    done = subprocess.run(
        [str(BIN / "st"), "run", f"{gw.url}/openapi.json", "--header",
         f"Authorization: Bearer {KEY}", "--checks", "not_a_server_error,"
         "status_code_conformance,content_type_conformance,response_schema_conformance",
         "--mode", "positive", "--max-examples", "8", "--seed", "17",
         "--generation-deterministic", "--phases", "examples,fuzzing", "--workers", "1",
         "--request-timeout", "30", "--no-color"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "passed" in done.stdout.lower()
    # The gateway is still fine: nothing the run sent left it broken.
    assert gw.client.get("/readyz").status_code == 200


CLI = """
import json, sys
from click.testing import CliRunner
from mlflow.cli import cli
runner, results = CliRunner(), []
for args in json.loads(sys.argv[1]):
    result = runner.invoke(cli, args)
    results.append({"code": result.exit_code, "output": result.output,
                    "error": str(result.exception or "")})
print(json.dumps(results))
"""


def mlflow_cli(gw: GatewayProcess, cwd: Path, *commands: list[str]) -> list[dict[str, Any]]:
    """MLflow's own CLI in one subprocess (MLflow is imported once for all commands); in
    ``cwd``, where MLflow may leave an mlflow.db."""
    env = {**os.environ, "MODEL_GATEWAY_URL": gw.url, "MODEL_GATEWAY_API_KEY": KEY,
           "MODEL_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    done = subprocess.run([sys.executable, "-c", CLI, json.dumps(commands)], env=env,
                          capture_output=True, text=True, timeout=180, cwd=cwd)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mlflow_deployments_target(gw: GatewayProcess, tmp_path: Path) -> None:
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([dict(zip(IRIS_COLUMNS, r, strict=True)) for r in ROWS]))
    target = ["-t", "model-gateway"]
    created, predicted, got, listed, updated, explained, refused = mlflow_cli(
        gw, tmp_path,
        ["deployments", "create", *target, "--name", "iris/canary", "-m", "models:/iris/1",
         "-C", "request_timeout=30s", "-C", "workers=1"],
        ["deployments", "predict", *target, "--name", "iris/canary", "-I", str(rows)],
        ["deployments", "get", *target, "--name", "iris/canary"],
        ["deployments", "list", "-t", f"model-gateway:/{gw.url}"],
        ["deployments", "update", *target, "--name", "iris/canary", "-C", "pinned=true"],
        ["deployments", "explain", *target, "--name", "iris/canary", "-I", str(rows)],
        ["deployments", "delete", *target, "--name", "iris/champion"])
    assert created["code"] == 0, created
    assert json.loads(predicted["output"].strip().splitlines()[-1]) == {"predictions": EXPECTED}
    assert "name: iris/canary" in got["output"] and "version: 1" in got["output"]
    assert "'iris/canary'" in listed["output"] and "'iris/champion'" in listed["output"]
    assert updated["code"] == 0, updated
    assert explained["code"] != 0 and "cannot explain" in explained["error"]
    assert refused["code"] != 0 and "is declared in" in refused["error"]
    state = json.loads((Path(gw.config_path).parent / "state" / "endpoints.json").read_text())
    assert state["endpoints"] == [{"name": "iris", "alias": "canary",
                                   "model_uri": "models:/iris/1", "workers": 1,
                                   "request_timeout": 30.0, "pinned": True}]
    assert "canary" not in gw.config_path.read_text()  # never written into the config file
    # `mlflow deployments` as a user types it, then the endpoint is gone.
    env = {**os.environ, "MODEL_GATEWAY_URL": gw.url, "MODEL_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    deleted = subprocess.run([str(BIN / "mlflow"), "deployments", "delete", *target, "--name",
                              "iris/canary"], env=env, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert deleted.returncode == 0, deleted.stderr[-3000:]
    assert gw.client.get("/models/iris/canary", headers={**AUTH}).status_code == 404
