"""The OpenAPI document built from signatures, the /docs page and the V2 server routes."""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from gateway.openapi import base_document, build
from runners import Endpoint, EndpointSpec, ResolveError
from runners.signature import ModelMetadata
from tests.gateway.conftest import serve
from tests.gateway.test_v2_codec import IMAGE, IRIS

EXAMPLE = {"dataframe_split": {"columns": ["sepal_length", "sepal_width", "petal_length",
                                           "petal_width"], "data": [[5.1, 3.5, 1.4, 0.2]]}}


def endpoint(name: str, alias: str) -> Endpoint:
    return Endpoint(EndpointSpec(name=name, alias=alias, model_uri=f"models:/{name}@{alias}"))


async def document() -> dict[str, Any]:
    metas = {"iris": ModelMetadata(**{**IRIS.__dict__, "example": EXAMPLE}), "img": IMAGE}

    async def fetch(ep: Endpoint) -> ModelMetadata:
        if ep.spec.name not in metas:
            raise ResolveError("RestException: RESOURCE_DOES_NOT_EXIST")
        return metas[ep.spec.name]

    eps = [endpoint("iris", "champion"), endpoint("img", "v1"), endpoint("my model", "a")]
    return await build(eps, fetch, base_document(""))


@pytest.mark.anyio
async def test_one_valid_path_per_endpoint_with_schemas_from_the_signature() -> None:
    doc = await document()
    validate(doc)  # openapi-spec-validator: a valid OpenAPI 3.1 document
    assert doc["openapi"] == "3.1.0"
    paths = doc["paths"]
    iris = paths["/models/iris/champion/invocations"]["post"]
    body = iris["requestBody"]["content"]["application/json"]
    assert body["example"] == EXAMPLE
    check = jsonschema.Draft202012Validator(body["schema"])
    check.validate(EXAMPLE)
    records = {"dataframe_records": [{"sepal_length": 1.0, "sepal_width": 1.0,
                                      "petal_length": 1.0, "petal_width": 1.0}]}
    check.validate(records)
    assert not check.is_valid({"dataframe_records": [{"sepal_length": "x"}]})
    assert not check.is_valid({"dataframe_split": {"columns": ["colour"], "data": []}})
    tensor = jsonschema.Draft202012Validator(
        paths["/models/img/v1/invocations"]["post"]["requestBody"]["content"][
            "application/json"]["schema"])
    assert tensor.is_valid({"inputs": [[[1.0, 2.0], [3.0, 4.0]]]})
    assert not tensor.is_valid({"inputs": [1.0]})
    # A model whose signature cannot be read still gets its path, with a generic schema.
    unknown = paths["/models/my%20model/a/invocations"]["post"]
    assert "RESOURCE_DOES_NOT_EXIST" in unknown["description"]
    # Admin routes carry the admin token's scheme; inference routes the api key's.
    assert paths["/admin/endpoints"]["get"]["security"] == [{"adminToken": []}]
    assert paths["/admin/deployments/{name}/{alias}"]["delete"]["security"] == [
        {"adminToken": []}]
    assert iris["security"] == [{"apiKey": []}, {}]
    for path in ("/v2", "/v2/health/ready", "/v2/models/{name}/versions/{alias}/infer",
                 "/openapi.json", "/docs"):
        assert path in paths, path


@pytest.mark.anyio
async def test_the_docs_page_ships_its_assets_and_loads_nothing_from_elsewhere() -> None:
    async with serve({"server": {"url_prefix": "/gw"}}) as served, \
            httpx.AsyncClient(base_url=served.url) as client:
        page = await client.get("/gw/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(not s.startswith(("http", "//")) for s in sources)
        for source in sources:  # relative: served under the prefix too
            asset = await client.get(f"/gw/{source}")
            assert asset.status_code == 200, source
        bundle = await client.get("/gw/docs/assets/swagger-ui-bundle.js")
        assert bundle.headers["content-type"].startswith("text/javascript")
        assert len(bundle.content) > 500_000  # Swagger UI itself, not a loader
        assert "openapi.json" in (await client.get("/gw/docs/assets/docs.js")).text
        missing = await client.get("/gw/docs/assets/..%2F..%2Fetc%2Fpasswd")
        assert missing.status_code == 404
        assert (await client.get("/gw/v2")).json()["name"] == "mlflow-model-gateway"
        assert (await client.get("/gw/v2/health/live")).json() == {"live": True}
        ready = await client.get("/gw/v2/health/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        # Two tiny endpoints, none marked default: the version must be named.
        ambiguous = await client.get("/gw/v2/models/tiny/ready")
        assert ambiguous.status_code == 404 and "none is marked default" in \
            ambiguous.json()["error"]
        one = await client.get("/gw/v2/models/tiny/versions/a/ready")
        assert one.json() == {"name": "tiny", "ready": True, "state": "cold"}
        nope = await client.post("/gw/v2/models/nope/infer", content=b"{")
        assert nope.status_code == 404 and nope.json() == {"error": "no model 'nope' is "
                                                                    "declared"}
