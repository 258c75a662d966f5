"""Open Inference Protocol (V2) ↔ MLflow's scoring protocol, from a model's signature.

The mapping is the one MLServer's MLflow runtime uses:

- a **column signature** (``ColSpec``) is one V2 input per column, shape ``[-1]``, with
  ``boolean → BOOL``, ``integer → INT32``, ``long → INT64``, ``float → FP32``,
  ``double → FP64`` and ``string``/``binary``/``datetime`` (and anything else) ``→ BYTES``;
  a request becomes ``{"dataframe_split": {"columns": […], "data": rows}}``;
- a **tensor signature** (``TensorSpec``) is one shaped V2 tensor per spec (numpy dtype →
  V2 datatype; unnamed ones are ``input-0``, ``input-1`` …); a request becomes
  ``{"inputs": nested}`` for one unnamed tensor, else ``{"inputs": {name: nested}}``;
- V2 ``parameters`` (but ``content_type`` and ``headers``) become MLflow ``params``;
- MLflow's ``predictions`` become outputs: one per column of records or key of a dict,
  else one named after the signature's single output or ``output-0``.

Every check of a caller's request raises :class:`V2Error` (400, the protocol's
``{"error": "…"}``): nothing in a request body is trusted.
"""

from __future__ import annotations

import json
import math
from typing import Any

from runners.signature import ModelMetadata

COLUMN_TYPES = {"boolean": "BOOL", "integer": "INT32", "long": "INT64", "float": "FP32",
                "double": "FP64", "string": "BYTES", "binary": "BYTES", "datetime": "BYTES"}
NUMPY_TYPES = {"bool": "BOOL", "int8": "INT8", "int16": "INT16", "int32": "INT32",
               "int64": "INT64", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
               "uint64": "UINT64", "float16": "FP16", "float32": "FP32", "float64": "FP64"}
DATATYPES = frozenset({*NUMPY_TYPES.values(), "BYTES"})
_INTS = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
_FLOATS = frozenset({"FP16", "FP32", "FP64"})
RESERVED_PARAMETERS = frozenset({"content_type", "headers"})
MAX_ELEMENTS = 10_000_000  # per input: a shape may not promise more


class V2Error(Exception):
    """A request the protocol refuses; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# -- metadata -----------------------------------------------------------------------------
def is_tensor_schema(specs: list[dict[str, Any]] | None) -> bool:
    return bool(specs) and all(s.get("type") == "tensor" for s in specs or [])


def spec_datatype(spec: dict[str, Any]) -> str:
    if spec.get("type") == "tensor":
        dtype = str((spec.get("tensor-spec") or {}).get("dtype", "")).lower()
        return NUMPY_TYPES.get(dtype, "BYTES")
    return COLUMN_TYPES.get(str(spec.get("type")), "BYTES")


def spec_shape(spec: dict[str, Any]) -> list[int]:
    if spec.get("type") == "tensor":
        shape = (spec.get("tensor-spec") or {}).get("shape") or [-1]
        return [int(d) for d in shape]
    return [-1]


def tensors(specs: list[dict[str, Any]] | None, prefix: str) -> list[dict[str, Any]]:
    """V2 metadata tensors (``name``, ``datatype``, ``shape``) of a signature's specs."""
    return [{"name": str(s.get("name") or f"{prefix}-{i}"), "datatype": spec_datatype(s),
             "shape": spec_shape(s)} for i, s in enumerate(specs or [])]


def model_metadata(name: str, version: str | None, meta: ModelMetadata) -> dict[str, Any]:
    return {"name": name, "versions": [version] if version else [], "platform": "mlflow",
            "inputs": tensors(meta.inputs, "input"), "outputs": tensors(meta.outputs, "output")}


# -- requests -----------------------------------------------------------------------------
def _flatten(data: Any, depth: int = 0) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if depth > 32:
        raise V2Error("data is nested too deeply")
    if not any(type(item) is list for item in data):  # the innermost level: as it is
        return data
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item, depth + 1) if isinstance(item, list) else (item,))
    return out


# The JSON types each datatype takes as they are (bool is not an int here: ``type() is``).
PLAIN = {**{t: frozenset({int}) for t in ("INT8", "INT16", "INT32", "INT64", "UINT8",
                                          "UINT16", "UINT32", "UINT64")},
         **{t: frozenset({float}) for t in ("FP16", "FP32", "FP64")},
         "BOOL": frozenset({bool}), "BYTES": frozenset({str})}


def _check_values(flat: list[Any], datatype: str, name: str) -> list[Any]:
    """``flat`` as the Python type of ``datatype``; V2Error naming the first value that is
    not one. Plain values (every float finite) are taken as they are, in one pass."""
    plain = PLAIN[datatype]
    if all(type(v) in plain for v in flat) and \
            (datatype not in _FLOATS or all(map(math.isfinite, flat))):
        return flat
    return [_check_value(v, datatype, name) for v in flat]


def _check_value(value: Any, datatype: str, name: str) -> Any:
    """``value`` as the Python type of ``datatype``; V2Error when it is not one."""
    if datatype == "BOOL":
        if isinstance(value, bool):
            return value
    elif datatype in _INTS:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif datatype in _FLOATS:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value):
            return float(value)
        if value in ("NaN", "Infinity", "-Infinity") or value is None:
            return None  # JSON has no NaN: MLflow takes a missing value
    elif isinstance(value, str):
        return value
    raise V2Error(f"input {name!r}: {_short(value)} is not a {datatype} value")


def _short(value: Any) -> str:
    """A caller's value in a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reshape(flat: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_reshape(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def parse_input(item: Any, index: int) -> tuple[str, str, list[int], list[Any]]:
    """One request input checked: (name, datatype, shape, flat values)."""
    if not isinstance(item, dict):
        raise V2Error(f"inputs[{index}] must be an object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not name:
        raise V2Error(f"inputs[{index}].name must be a non-empty string")
    if datatype not in DATATYPES:
        raise V2Error(f"input {name!r}: datatype must be one of {', '.join(sorted(DATATYPES))}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0 for d in shape):
        raise V2Error(f"input {name!r}: shape must be a list of non-negative integers")
    if "data" not in item:
        raise V2Error(f"input {name!r}: data is required")
    size = math.prod(shape)
    if size > MAX_ELEMENTS:
        raise V2Error(f"input {name!r}: shape {shape} has more than {MAX_ELEMENTS} elements")
    flat = _flatten(item["data"])
    if len(flat) != size:
        raise V2Error(f"input {name!r}: shape {shape} needs {size} values, data has "
                      f"{len(flat)}")
    return name, datatype, shape, _check_values(flat, datatype, name)


def _fits(sent: str, wanted: str) -> bool:
    """Whether values of V2 datatype ``sent`` convert to ``wanted`` without loss of
    meaning (integers into floats, any width into another of its kind)."""
    if sent == wanted:
        return True
    if wanted in _FLOATS:
        return sent in _FLOATS or sent in _INTS
    return wanted in _INTS and sent in _INTS


def _as(flat: list[Any], sent: str, wanted: str) -> list[Any]:
    """Integers sent for a float column or tensor become floats (MLflow refuses to cast
    int64 to double itself)."""
    if wanted in _FLOATS and sent not in _FLOATS:
        return [None if v is None else float(v) for v in flat]
    return flat


def _shape_fits(shape: list[int], wanted: list[int]) -> bool:
    return len(shape) == len(wanted) and all(w == -1 or w == s for s, w in zip(shape, wanted,
                                                                              strict=True))


def to_mlflow(request: Any, meta: ModelMetadata) -> dict[str, Any]:
    """A V2 inference request as MLflow's scoring payload, checked against the signature."""
    if not isinstance(request, dict):
        raise V2Error("the request must be a JSON object")
    items = request.get("inputs")
    if not isinstance(items, list) or not items:
        raise V2Error("inputs must be a non-empty list")
    inputs = [parse_input(item, i) for i, item in enumerate(items)]
    names = [i[0] for i in inputs]
    if len(set(names)) != len(names):
        raise V2Error("input names must be unique")
    if is_tensor_schema(meta.inputs):
        payload = _tensor_payload(inputs, meta.inputs or [])
    elif meta.inputs:
        payload = _column_payload(inputs, meta.inputs)
    else:  # no signature: columns when every input is one, else tensors by name
        payload = _column_payload(inputs, None)
    params = request.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise V2Error("parameters must be an object")
    params = {k: v for k, v in (params or {}).items() if k not in RESERVED_PARAMETERS}
    if params:
        payload["params"] = params
    return payload


def _column_payload(inputs: list[tuple[str, str, list[int], list[Any]]],
                    specs: list[dict[str, Any]] | None) -> dict[str, Any]:
    if specs is None and any(len(shape) > 1 and shape[1:] != [1] for _, _, shape, _ in inputs):
        if len(inputs) == 1:
            return {"inputs": _reshape(inputs[0][3], inputs[0][2])}
        return {"inputs": {name: _reshape(flat, shape) for name, _, shape, flat in inputs}}
    by_name = {str(s.get("name")): s for s in specs or [] if s.get("name") is not None}
    rows = None
    values = []
    for name, datatype, shape, flat in inputs:
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise V2Error(f"input {name!r}: shape {shape} does not fit a column: "
                          f"expected [rows] or [rows, 1]")
        if rows is not None and shape[0] != rows:
            raise V2Error(f"input {name!r}: {shape[0]} rows, other inputs have {rows}")
        rows = shape[0]
        if specs is None:
            values.append(flat)
            continue
        spec = by_name.get(name)
        if spec is None:
            raise V2Error(f"input {name!r} is not in the model's signature (inputs: "
                          f"{', '.join(by_name) or 'unnamed'})")
        wanted = spec_datatype(spec)
        if not _fits(datatype, wanted):
            raise V2Error(f"input {name!r}: datatype {datatype} does not fit the signature's "
                          f"{wanted}")
        values.append(_as(flat, datatype, wanted))
    if specs is not None:
        missing = [n for n, s in by_name.items() if s.get("required", True)
                   and n not in {i[0] for i in inputs}]
        if missing:
            raise V2Error(f"missing inputs: {', '.join(missing)}")
    columns = [name for name, _, _, _ in inputs]
    data = [list(row) for row in zip(*values, strict=True)]
    return {"dataframe_split": {"columns": columns, "data": data}}


def _tensor_payload(inputs: list[tuple[str, str, list[int], list[Any]]],
                    specs: list[dict[str, Any]]) -> dict[str, Any]:
    named = {str(s.get("name") or f"input-{i}"): s for i, s in enumerate(specs)}
    checked = []
    for name, datatype, shape, flat in inputs:
        spec = named.get(name) if len(specs) > 1 or name in named else specs[0]
        if spec is None:
            raise V2Error(f"input {name!r} is not in the model's signature (inputs: "
                          f"{', '.join(named)})")
        wanted, wanted_shape = spec_datatype(spec), spec_shape(spec)
        if not _fits(datatype, wanted):
            raise V2Error(f"input {name!r}: datatype {datatype} does not fit the signature's "
                          f"{wanted}")
        if not _shape_fits(shape, wanted_shape):
            raise V2Error(f"input {name!r}: shape {shape} does not fit the signature's "
                          f"{wanted_shape}")
        checked.append((name, datatype, shape, _as(flat, datatype, wanted)))
    inputs = checked
    missing = [n for n in named if n not in {i[0] for i in inputs}]
    if len(specs) > 1 and missing:
        raise V2Error(f"missing inputs: {', '.join(missing)}")
    if len(specs) == 1 and specs[0].get("name") is None:
        return {"inputs": _reshape(inputs[0][3], inputs[0][2])}
    return {"inputs": {name: _reshape(flat, shape) for name, _, shape, flat in inputs}}


# -- answers ------------------------------------------------------------------------------
def _shape_of(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def _infer_datatype(flat: list[Any]) -> str:
    if flat and all(isinstance(v, bool) for v in flat):
        return "BOOL"
    if flat and all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        return "INT64"
    if flat and all((isinstance(v, (int, float)) and not isinstance(v, bool)) or v is None
                    for v in flat):
        return "FP64"
    return "BYTES"


def _output(name: str, values: Any, spec: dict[str, Any] | None) -> dict[str, Any]:
    shape = _shape_of(values) or [1]
    flat = _flatten(values)
    if math.prod(shape) != len(flat):  # ragged: one BYTES element per row
        import json

        flat, shape = [json.dumps(v) for v in values], [len(values)]
    datatype = spec_datatype(spec) if spec is not None else _infer_datatype(flat)
    if datatype == "BYTES":
        flat = [v if isinstance(v, str) else ("" if v is None else str(v)) for v in flat]
    return {"name": name, "datatype": datatype, "shape": shape, "data": flat}


def from_mlflow(answer: Any, meta: ModelMetadata) -> list[dict[str, Any]]:
    """MLflow's answer (``{"predictions": …}``) as V2 outputs."""
    predictions = answer.get("predictions", answer) if isinstance(answer, dict) else answer
    specs = meta.outputs or []
    by_name = {str(s.get("name")): s for s in specs if s.get("name") is not None}
    if isinstance(predictions, dict):
        return [_output(str(k), v, by_name.get(str(k))) for k, v in predictions.items()]
    if isinstance(predictions, list) and predictions and \
            all(isinstance(row, dict) for row in predictions):
        columns = list(dict.fromkeys(k for row in predictions for k in row))
        return [_output(str(c), [row.get(c) for row in predictions], by_name.get(str(c)))
                for c in columns]
    spec = specs[0] if len(specs) == 1 else None
    name = str(spec.get("name")) if spec is not None and spec.get("name") else "output-0"
    return [_output(name, predictions, spec)]


def select_outputs(outputs: list[dict[str, Any]], request: dict[str, Any]
                   ) -> list[dict[str, Any]]:
    """The outputs the request asked for (``outputs: [{"name": …}]``), else all."""
    wanted = request.get("outputs")
    if wanted is None:
        return outputs
    if not isinstance(wanted, list) or not all(isinstance(w, dict) and
                                               isinstance(w.get("name"), str) for w in wanted):
        raise V2Error("outputs must be a list of objects with a name")
    have = {o["name"]: o for o in outputs}
    unknown = [w["name"] for w in wanted if w["name"] not in have]
    if unknown:
        raise V2Error(f"unknown outputs: {', '.join(unknown)} (the model answers "
                      f"{', '.join(have)})")
    return [have[w["name"]] for w in wanted]


# Triton's request parameters (its client sends some on its own): not the model's params.
TRITON_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority",
                               "timeout", "binary_data_output", "binary_data",
                               "binary_data_size"})


def mlflow_message(answer: bytes, status: int) -> str:
    """The message of MLflow's error answer (or of the gateway's own error shape)."""
    try:
        parsed = json.loads(answer)
    except ValueError:
        return f"the model answered {status}"
    if isinstance(parsed, dict):
        message = parsed.get("message") or parsed.get("error")
        if isinstance(message, dict):
            message = message.get("message")
        if isinstance(message, str):
            return message.strip().splitlines()[0][:2000] if message.strip() else str(status)
    return f"the model answered {status}"


def mlflow_body(request: dict[str, Any], meta: ModelMetadata) -> bytes:
    """The runner's request body for a V2 inference request: MLflow's payload, without
    Triton's own request parameters."""
    payload = to_mlflow(request, meta)
    params = payload.get("params")
    if params is not None:
        params = {k: v for k, v in params.items() if k not in TRITON_PARAMETERS}
        if params:
            payload["params"] = params
        else:
            del payload["params"]
    return json.dumps(payload, separators=(",", ":")).encode()


def v2_answer(name: str, version: str | None, request: dict[str, Any], answer: Any,
              meta: ModelMetadata) -> dict[str, Any]:
    """The V2 inference answer for MLflow's parsed ``answer`` to ``request``."""
    return {"model_name": name, "model_version": version or "",
            **({"id": request["id"]} if isinstance(request.get("id"), str) else {}),
            "outputs": select_outputs(from_mlflow(answer, meta), request)}
