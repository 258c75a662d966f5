"""The ``model-gateway`` target of ``mlflow deployments`` (entry point group
``mlflow.deployments``): MLflow's deployment client API over a running gateway's HTTP.

    mlflow deployments list   -t model-gateway
    mlflow deployments create -t model-gateway --name iris/canary -m models:/iris/2 -C workers=2
    mlflow deployments predict -t model-gateway:/http://gw:8080 --name iris/champion -I in.json

A deployment is an endpoint, named ``<name>/<alias>``. The gateway's URL comes from the
target (``model-gateway:/http://host:port``) or ``MODEL_GATEWAY_URL`` (default
``http://localhost:8080``); ``MODEL_GATEWAY_ADMIN_TOKEN`` authorizes create, update and
delete, ``MODEL_GATEWAY_API_KEY`` the rest. Loaded by MLflow only: it imports MLflow.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote, urlparse

import httpx
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException

DEFAULT_URL = "http://localhost:8080"
TIMEOUT = float(os.environ.get("MODEL_GATEWAY_TIMEOUT", "300"))
FLAVOR = "python_function"  # what MLflow's scoring server serves
PAYLOAD_KEYS = {"dataframe_split", "dataframe_records", "instances", "inputs"}


def target_help() -> str:
    return """\
Target: model-gateway (mlflow-model-gateway: many MLflow models behind one URL)

Target URI: model-gateway (the gateway at $MODEL_GATEWAY_URL, default http://localhost:8080)
            or model-gateway:/http://host:port
A deployment is one of the gateway's endpoints, named <name>/<alias>; it serves
POST /models/<name>/<alias>/invocations.

create/update take the endpoint's keys as -C key=value (workers, env_manager, launcher,
request_timeout, poll_interval, preload, pinned, public, default, ...; see the gateway's
config reference) and need an admin token in $MODEL_GATEWAY_ADMIN_TOKEN. Endpoints
declared in the gateway's config file cannot be changed or deleted this way.
list/get/predict use $MODEL_GATEWAY_API_KEY when the gateway requires api keys.
explain: not served (MLflow's scoring protocol has no explanations).
"""


def run_local(name: str, model_uri: str, flavor: str | None = None,
              config: dict[str, Any] | None = None) -> None:
    """Serve ``model_uri`` as endpoint ``name`` on a gateway in the foreground
    (``-C port=8080 -C host=127.0.0.1``, and any endpoint key). MLflow calls it without
    the target, whatever its documented signature says."""
    import tempfile

    import yaml

    from .cli import main

    _flavor(flavor)
    model, alias = _split(name)
    settings = _typed(config or {})
    server = {"host": settings.pop("host", "127.0.0.1"), "port": settings.pop("port", 8080)}
    endpoint = {"name": model, "alias": alias, "model_uri": model_uri, **settings}
    with tempfile.TemporaryDirectory(prefix="model-gateway-") as tmp:
        path = os.path.join(tmp, "gateway.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump({"server": server, "endpoints": [endpoint]}, fh)
        main(["serve", "--config", path])


def _split(name: str | None) -> tuple[str, str]:
    parts = (name or "").split("/")
    if len(parts) != 2 or not all(parts):
        raise MlflowException(f"deployment name {name!r}: expected <name>/<alias>, e.g. "
                              "iris/champion")
    return parts[0], parts[1]


class GatewayDeploymentClient(BaseDeploymentClient):
    """``mlflow.deployments.get_deploy_client("model-gateway")``."""

    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        parsed = urlparse(target_uri)
        path = parsed.path.lstrip("/") if parsed.scheme else ""
        self.url = (path or os.environ.get("MODEL_GATEWAY_URL") or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise MlflowException(f"target {target_uri!r}: expected model-gateway or "
                                  "model-gateway:/http://host:port")

    # -- HTTP -----------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, admin: bool = False,
              extra: dict[str, str] | None = None, **kw: Any) -> Any:
        token = os.environ.get("MODEL_GATEWAY_ADMIN_TOKEN" if admin else
                               "MODEL_GATEWAY_API_KEY")
        headers = {**(extra or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        try:
            with httpx.Client(base_url=self.url, timeout=TIMEOUT) as client:
                answer = client.request(method, path, headers=headers, **kw)
        except httpx.HTTPError as exc:
            raise MlflowException(f"model-gateway at {self.url}: {exc}") from exc
        try:
            body = answer.json()
        except ValueError:
            body = {"error": answer.text[:500]}
        if answer.status_code >= 400:
            raise MlflowException(f"model-gateway: {answer.status_code} {_message(body)}")
        return body

    @staticmethod
    def _path(name: str | None, suffix: str = "") -> str:
        model, alias = _split(name)
        return f"/models/{quote(model, safe='')}/{quote(alias, safe='')}{suffix}"

    def _change(self, method: str, name: str, body: dict[str, Any] | None) -> dict[str, Any]:
        model, alias = _split(name)
        path = f"/admin/deployments/{quote(model, safe='')}/{quote(alias, safe='')}"
        answer = self._call(method, path, admin=True,
                            **({"json": body} if body is not None else {}))
        return _deployment(answer)

    # -- MLflow's API ---------------------------------------------------------------------
    def create_deployment(self, name: str, model_uri: str, flavor: str | None = None,
                          config: dict[str, Any] | None = None, endpoint: str | None = None
                          ) -> dict[str, Any]:
        _flavor(flavor)
        return self._change("POST", name, {"model_uri": model_uri,
                                           "config": _typed(config or {})})

    def update_deployment(self, name: str, model_uri: str | None = None,
                          flavor: str | None = None, config: dict[str, Any] | None = None,
                          endpoint: str | None = None) -> dict[str, Any]:
        _flavor(flavor)
        return self._change("PATCH", name, {"model_uri": model_uri,
                                            "config": _typed(config or {})})

    def delete_deployment(self, name: str, config: dict[str, Any] | None = None,
                          endpoint: str | None = None) -> None:
        self._change("DELETE", name, None)

    def list_deployments(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        return [_deployment(e) for e in self._call("GET", "/models")["endpoints"]]

    def get_deployment(self, name: str, endpoint: str | None = None) -> dict[str, Any]:
        return _deployment(self._call("GET", self._path(name)))

    def predict(self, deployment_name: str | None = None, inputs: Any = None,
                endpoint: str | None = None) -> PredictionsResponse:
        return PredictionsResponse(self._call(
            "POST", self._path(deployment_name, "/invocations"), content=_payload(inputs),
            extra={"Content-Type": "application/json"}))

    def explain(self, deployment_name: str | None = None, df: Any = None,
                endpoint: str | None = None) -> Any:
        raise MlflowException(f"model-gateway: {deployment_name} cannot explain: MLflow's "
                              "scoring servers answer predictions only (use predict)")


def _deployment(status: dict[str, Any]) -> dict[str, Any]:
    """An endpoint's status as a deployment: ``name`` is ``<name>/<alias>``."""
    name, alias = status.get("name"), status.get("alias")
    return {**status, "name": f"{name}/{alias}", "model_name": name, "flavor": FLAVOR}


def _flavor(flavor: str | None) -> None:
    if flavor not in (None, FLAVOR):
        raise MlflowException(f"model-gateway serves the {FLAVOR} flavor only, not {flavor!r}")


def _typed(config: dict[str, Any]) -> dict[str, Any]:
    """``-C key=value`` gives strings: numbers, booleans and null as YAML reads them."""
    import yaml

    out = {}
    for key, value in config.items():
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        out[key] = value
    return out


def _payload(inputs: Any) -> bytes:
    """MLflow's scoring JSON for ``inputs``: a DataFrame as ``dataframe_split``, a payload
    dict as it is, anything else as ``inputs``."""
    import pandas as pd  # type: ignore[import-untyped]

    if isinstance(inputs, pd.DataFrame):
        split: str = inputs.to_json(orient="split", index=False)
        return ('{"dataframe_split": ' + split + "}").encode()
    if isinstance(inputs, dict) and set(inputs) & PAYLOAD_KEYS:
        return json.dumps(inputs).encode()
    if hasattr(inputs, "tolist"):
        inputs = inputs.tolist()
    return json.dumps({"inputs": inputs}).encode()


def _message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error", body.get("message"))
        if isinstance(error, dict):
            return str(error.get("message") or error)
        return str(error if error is not None else body)
    return str(body)
