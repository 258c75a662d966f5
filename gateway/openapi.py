"""The OpenAPI 3.1 document of a running gateway: its routes, and one path per endpoint.

Each declared endpoint the caller may call gets ``POST /models/<name>/<alias>/invocations``
with request and answer schemas built from its model's MLflow signature and, when the
model saved one, its serving input example as the request's example (both read through
``runners.signature``, once per version, without starting a runner). Admin routes carry
the ``adminToken`` security scheme, inference and metadata routes ``apiKey``.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from runners import Endpoint
from runners.signature import ModelMetadata

from .v2_codec import is_tensor_schema

JSON = "application/json"
COLUMN_SCHEMAS: dict[str, dict[str, Any]] = {
    "boolean": {"type": "boolean"}, "integer": {"type": "integer"},
    "long": {"type": "integer"}, "float": {"type": "number"}, "double": {"type": "number"},
    "string": {"type": "string"}, "binary": {"type": "string", "contentEncoding": "base64"},
    "datetime": {"type": "string"}}
ERROR = {"$ref": "#/components/schemas/Error"}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _content(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {JSON: media}


def _answers(ok: dict[str, Any] | None = None, *statuses: int) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": "OK", "content": _content(ok or ANY_OBJECT)}}
    for status in statuses:
        out[str(status)] = {"description": _REASONS[status], "content": _content(ERROR)}
    out["default"] = {"description": "an error", "content": _content(ERROR)}
    return out


_REASONS = {400: "a request that does not fit", 401: "no valid token", 403: "disabled",
            404: "not declared", 409: "a conflict", 413: "body too large",
            502: "runner unreachable", 503: "unavailable", 504: "runner timeout"}
_MODEL_ERRORS = (400, 401, 404, 413, 502, 503, 504)


def _params(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[^/:]+$"}} for n in names]


def column_schema(spec: dict[str, Any]) -> dict[str, Any]:
    return COLUMN_SCHEMAS.get(str(spec.get("type")), {})


def _nested(depth: int, item: dict[str, Any]) -> dict[str, Any]:
    for _ in range(max(depth, 1)):
        item = {"type": "array", "items": item}
    return item


def request_schema(meta: ModelMetadata | None) -> dict[str, Any]:
    """MLflow's scoring payloads this model's signature accepts."""
    specs = meta.inputs if meta is not None else None
    if not specs:
        return {"type": "object", "description": "MLflow's scoring protocol: dataframe_split, "
                "dataframe_records, instances or inputs"}
    if is_tensor_schema(specs):
        tensors = {}
        for i, spec in enumerate(specs):
            shape = (spec.get("tensor-spec") or {}).get("shape") or [-1]
            dtype = str((spec.get("tensor-spec") or {}).get("dtype", ""))
            item = {"type": "number"} if dtype.startswith(("float", "int", "uint")) else {}
            tensors[str(spec.get("name") or f"input-{i}")] = _nested(len(shape), item)
        value = next(iter(tensors.values())) if len(specs) == 1 and not specs[0].get("name") \
            else {"type": "object", "properties": tensors, "required": list(tensors)}
        return {"anyOf": [{"type": "object", "required": ["inputs"],
                           "properties": {"inputs": value}},
                          {"type": "object", "required": ["instances"],
                           "properties": {"instances": {"type": "array"}}}]}
    columns = {str(s.get("name")): column_schema(s) for s in specs if s.get("name")}
    required = [str(s["name"]) for s in specs if s.get("name") and s.get("required", True)]
    return {"anyOf": [
        {"type": "object", "required": ["dataframe_split"], "properties": {"dataframe_split": {
            "type": "object", "required": ["columns", "data"], "properties": {
                "columns": {"type": "array", "items": {"enum": list(columns)}},
                "data": {"type": "array", "items": {"type": "array"}}}}}},
        {"type": "object", "required": ["dataframe_records"], "properties": {
            "dataframe_records": {"type": "array", "items": {
                "type": "object", "properties": columns, "required": required}}}}]}


def answer_schema(meta: ModelMetadata | None) -> dict[str, Any]:
    specs = meta.outputs if meta is not None else None
    predictions: dict[str, Any] = {}
    if specs and len(specs) == 1 and specs[0].get("type") == "tensor":
        shape = (specs[0].get("tensor-spec") or {}).get("shape") or [-1]
        predictions = _nested(len(shape), {})
    elif specs:
        predictions = {"anyOf": [{"type": "array"}, {"type": "object"}]}
    return {"type": "object", "required": ["predictions"],
            "properties": {"predictions": predictions}}


def endpoint_path(ep: Endpoint, meta: ModelMetadata | None, problem: str | None
                  ) -> dict[str, Any]:
    name, alias = ep.spec.name, ep.spec.alias
    version = meta.version if meta is not None else None
    description = f"`{ep.spec.model_uri}`" + (f", version {version}" if version else "")
    if problem:
        description += f". The model's signature could not be read: {problem}"
    return {"post": {
        "operationId": f"predict-{quote(name, safe='')}-{quote(alias, safe='')}",
        "tags": ["models"], "summary": f"Predict with {name}/{alias}",
        "description": description, "security": [{"apiKey": []}, {}],
        "requestBody": {"required": True, "content": _content(
            request_schema(meta), meta.example if meta is not None else None)},
        "responses": _answers(answer_schema(meta), *_MODEL_ERRORS)}}


async def build(endpoints: list[Endpoint], fetch: Any, base: dict[str, Any]
                ) -> dict[str, Any]:
    """The document: ``base`` (the gateway's own routes) plus one path per endpoint;
    ``fetch(ep)`` returns its ModelMetadata (an exception: a generic schema for it)."""
    found = await asyncio.gather(*(fetch(ep) for ep in endpoints), return_exceptions=True)
    paths = {path: _with_examples(item, endpoints) for path, item in base["paths"].items()}
    for ep, meta in zip(endpoints, found, strict=True):
        problem = None if isinstance(meta, ModelMetadata) else str(meta)
        path = f"/models/{quote(ep.spec.name, safe='')}/{quote(ep.spec.alias, safe='')}" \
            "/invocations"
        paths[path] = endpoint_path(ep, meta if isinstance(meta, ModelMetadata) else None,
                                    problem)
    return {**base, "paths": paths}


def _with_examples(item: dict[str, Any], endpoints: list[Endpoint]) -> dict[str, Any]:
    """A path item whose ``name``/``alias`` parameters offer the declared ones as examples
    (for the try-it page and for API testers)."""
    if not endpoints or "parameters" not in item:
        return item
    values = {"name": list(dict.fromkeys(ep.spec.name for ep in endpoints)),
              "alias": list(dict.fromkeys(ep.spec.alias for ep in endpoints))}
    params = [{**p, "schema": {**p["schema"], "examples": values[p["name"]]}}
              if p["name"] in values else p for p in item["parameters"]]
    return {**item, "parameters": params}


def _get(summary: str, ok: dict[str, Any] | None = None, *statuses: int, tag: str,
         security: list[dict[str, Any]] | None = None, media: str | None = None
         ) -> dict[str, Any]:
    op: dict[str, Any] = {"tags": [tag], "summary": summary, "responses": _answers(ok, *statuses)}
    if media is not None:
        op["responses"]["200"] = {"description": "OK", "content": {media: {"schema": {
            "type": "string"}}}}
    if security is not None:
        op["security"] = security
    return op


def base_document(url_prefix: str) -> dict[str, Any]:
    """Every route of the gateway but the per-endpoint ones."""
    key: list[dict[str, Any]] = [{"apiKey": []}, {}]
    admin: list[dict[str, Any]] = [{"adminToken": []}]
    ready = {"type": "object", "required": ["ready"], "properties": {"ready": {
        "type": "boolean"}}}
    v2_infer = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "datatype", "shape", "data"], "properties": {
                "name": {"type": "string"}, "shape": {"type": "array", "items": {
                    "type": "integer", "minimum": 0}},
                "datatype": {"enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8",
                                      "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
                                      "BYTES"]},
                "parameters": {"type": "object"}, "data": {"type": "array"}}}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"}}}}}}
    v2_answer = {"type": "object", "required": ["model_name", "outputs"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"},
        "id": {"type": "string"}, "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name", "datatype", "shape", "data"]}}}}
    v2_meta = {"type": "object", "required": ["name", "inputs", "outputs"], "properties": {
        "name": {"type": "string"}, "versions": {"type": "array"},
        "platform": {"type": "string"}, "inputs": {"type": "array"},
        "outputs": {"type": "array"}}}
    named, one = "/v2/models/{name}/versions/{alias}", "/v2/models/{name}"
    paths: dict[str, Any] = {
        "/healthz": {"get": _get("Liveness", None, tag="probes")},
        "/readyz": {"get": _get("Readiness", None, 503, tag="probes")},
        "/metrics": {"get": _get("Prometheus metrics", None, tag="probes",
                                 media="text/plain")},
        "/models": {"get": _get("Declared endpoints", None, 401, tag="models", security=key)},
        "/models/{name}/{alias}": {"parameters": _params("name", "alias"), "get": _get(
            "An endpoint's status", None, 401, 404, tag="models", security=key)},
        "/v2": {"get": _get("V2 server metadata", None, tag="v2")},
        "/v2/health/live": {"get": _get("V2 server live", None, tag="v2")},
        "/v2/health/ready": {"get": _get("V2 server ready", ready, 503, tag="v2")},
        "/openapi.json": {"get": _get("This document", None, tag="docs")},
        "/docs": {"get": _get("Swagger UI", None, tag="docs", media="text/html")},
        "/admin/endpoints": {"get": _get("Every endpoint, with runner details", None, 401,
                                         403, tag="admin", security=admin)},
        "/admin/config/reload": {"post": _get("Re-read the config file", None, 400, 401,
                                              403, tag="admin", security=admin)},
    }
    for path, params in ((one, ("name",)), (named, ("name", "alias"))):
        paths[path] = {"parameters": _params(*params), "get": _get(
            "V2 model metadata", v2_meta, 401, 404, 503, tag="v2", security=key)}
        paths[f"{path}/ready"] = {"parameters": _params(*params), "get": _get(
            "V2 model ready", None, 400, 401, 404, tag="v2", security=key)}
        paths[f"{path}/infer"] = {"parameters": _params(*params), "post": {
            **_get("V2 inference", v2_answer, *_MODEL_ERRORS, tag="v2", security=key),
            "requestBody": {"required": True, "content": _content(v2_infer)}}}
    base = "/admin/endpoints/{name}/{alias}"
    for action in ("reload", "start", "stop"):
        paths[f"{base}/{action}"] = {"parameters": _params("name", "alias"), "post": _get(
            f"Endpoint {action}", None, 401, 403, 404, 503, tag="admin", security=admin)}
    paths[f"{base}/logs"] = {"parameters": _params("name", "alias"), "get": _get(
        "A runner's last output lines", None, 400, 401, 403, 404, tag="admin",
        security=admin)}
    deployment = {"type": "object", "required": ["model_uri"], "properties": {
        "model_uri": {"type": "string"}, "config": {"type": "object"}}}
    paths["/admin/deployments/{name}/{alias}"] = {"parameters": _params("name", "alias"), **{
        method: {**_get(summary, None, 400, 401, 403, 404, 409, tag="admin", security=admin),
                 **({"requestBody": {"required": True, "content": _content(deployment)}}
                    if method != "delete" else {})}
        for method, summary in (("post", "Declare an endpoint"),
                                ("patch", "Change an endpoint declared at run time"),
                                ("delete", "Remove an endpoint declared at run time"))}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlflow-model-gateway", "version": "0.1.0",
                 "description": "MLflow models behind one URL: MLflow's scoring protocol at "
                                "/models/<name>/<alias>/invocations and the Open Inference "
                                "Protocol (V2) at /v2."},
        "servers": [{"url": url_prefix or "/"}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "an api key (auth.api_keys) when set"},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "an admin token (auth.admin_tokens)"}},
            "schemas": {"Error": {
                "type": "object", "description": "the gateway's error ({code, message}), "
                "the V2 protocol's (a string) or MLflow's own (error_code, message)",
                "anyOf": [{"required": ["error"]}, {"required": ["message"]}],
                "properties": {"error": {"anyOf": [
                    {"type": "string"},
                    {"type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string"}, "message": {"type": "string"}}}]},
                    "error_code": {"type": "string"}, "message": {"type": "string"}}}}},
    }
