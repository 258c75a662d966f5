"""V2 (Open Inference Protocol) ↔ MLflow translation, from signatures as MLflow writes them."""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

import pytest

from gateway.v2_codec import (
    V2Error,
    from_mlflow,
    mlflow_body,
    model_metadata,
    select_outputs,
    to_mlflow,
    v2_answer,
)
from gateway.v2_fast import answer_body, plan_for, request_body
from runners.signature import ModelMetadata

COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
# What MLflow writes in MLmodel for the iris model of tests/registry.py (parsed).
IRIS = ModelMetadata(
    uri="models:/iris/1", version="1",
    inputs=[{"type": "double", "name": c, "required": True} for c in COLUMNS],
    outputs=[{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}])
MIXED = ModelMetadata(uri="m", version="2", inputs=[
    {"type": "long", "name": "age", "required": True},
    {"type": "string", "name": "city", "required": True},
    {"type": "boolean", "name": "member", "required": False},
    {"type": "float", "name": "score", "required": True}])
IMAGE = ModelMetadata(uri="m", version="3", inputs=[
    {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 2, 2]}}],
    outputs=[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3]},
              "name": "probs"}])
TWO_TENSORS = ModelMetadata(uri="m", version="4", inputs=[
    {"type": "tensor", "name": "a", "tensor-spec": {"dtype": "int32", "shape": [-1]}},
    {"type": "tensor", "name": "b", "tensor-spec": {"dtype": "float64", "shape": [-1, 2]}}])


def col(name: str, datatype: str, data: list[Any], shape: list[int] | None = None
        ) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def test_metadata_follows_mlservers_mapping() -> None:
    meta = model_metadata("iris", "1", IRIS)
    assert meta["name"] == "iris" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": c, "datatype": "FP64", "shape": [-1]} for c in COLUMNS]
    assert meta["outputs"] == [{"name": "output-0", "datatype": "INT64", "shape": [-1]}]
    mixed = model_metadata("m", "2", MIXED)["inputs"]
    assert [(t["name"], t["datatype"]) for t in mixed] == [
        ("age", "INT64"), ("city", "BYTES"), ("member", "BOOL"), ("score", "FP32")]
    image = model_metadata("img", "3", IMAGE)
    assert image["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 2, 2]}]
    assert image["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}]
    assert model_metadata("x", None, ModelMetadata(uri="x", version=None))["inputs"] == []


def test_columns_become_a_dataframe_split_with_the_signatures_types() -> None:
    request = {"inputs": [col(c, "FP64", [5.1, 6.7]) for c in COLUMNS[:3]]
               + [col("petal_width", "INT64", [0, 2], [2, 1])],
               "parameters": {"content_type": "pd", "threshold": 0.5}}
    payload = to_mlflow(request, IRIS)
    assert payload == {"dataframe_split": {"columns": COLUMNS, "data": [
        [5.1, 5.1, 5.1, 0.0], [6.7, 6.7, 6.7, 2.0]]}, "params": {"threshold": 0.5}}
    # Integers sent for a double column arrive as floats (MLflow refuses int64 → double).
    assert all(isinstance(v, float) for row in payload["dataframe_split"]["data"] for v in row)
    mixed = to_mlflow({"inputs": [col("age", "INT32", [30]), col("city", "BYTES", ["Oslo"]),
                                  col("score", "FP32", [0.5])]}, MIXED)
    assert mixed["dataframe_split"] == {"columns": ["age", "city", "score"],
                                        "data": [[30, "Oslo", 0.5]]}


@pytest.mark.parametrize(("inputs", "message"), [
    ([col("sepal_length", "BYTES", ["a"])], "datatype BYTES does not fit the signature's FP64"),
    ([col(c, "FP64", [1.0, 2.0], [3]) for c in COLUMNS], "shape [3] needs 3 values, data has 2"),
    ([col(c, "FP64", [1.0]) for c in COLUMNS[:3]], "missing inputs: petal_width"),
    ([col(c, "FP64", [1.0]) for c in COLUMNS] + [col("colour", "FP64", [1.0])],
     "'colour' is not in the model's signature"),
    ([col(c, "FP64", [1.0, 2.0], [1, 2]) for c in COLUMNS], "does not fit a column"),
    ([col("sepal_length", "FP64", [1.0, 2.0])] + [col(c, "FP64", [1.0]) for c in COLUMNS[1:]],
     "1 rows, other inputs have 2"),
    ([col(c, "FP64", ["x"]) for c in COLUMNS], "'x' is not a FP64 value"),
    ([col(c, "FP128", [1.0]) for c in COLUMNS], "datatype must be one of"),
    ([{"name": "sepal_length", "datatype": "FP64", "shape": [-1], "data": [1.0]}],
     "shape must be a list of non-negative integers"),
    ([{"name": "sepal_length", "datatype": "FP64", "shape": [10**9, 10**9], "data": []}],
     "more than"),
    ("not a list", "inputs must be a non-empty list"),
    ([col("a", "FP64", [1.0]), col("a", "FP64", [1.0])], "unique"),
])
def test_requests_that_do_not_fit_are_refused_with_a_reason(inputs: Any, message: str) -> None:
    with pytest.raises(V2Error, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        to_mlflow({"inputs": inputs}, IRIS)
    assert err.value.status == 400


def test_booleans_are_not_integers_and_integers_not_booleans() -> None:
    with pytest.raises(V2Error, match="True is not a INT64 value"):
        to_mlflow({"inputs": [col("age", "INT64", [True]), col("city", "BYTES", ["a"]),
                              col("score", "FP32", [1.0])]}, MIXED)
    with pytest.raises(V2Error, match="datatype INT64 does not fit the signature's BOOL"):
        to_mlflow({"inputs": [col("age", "INT64", [1]), col("city", "BYTES", ["a"]),
                              col("score", "FP32", [1.0]), col("member", "INT64", [1])]}, MIXED)


def test_tensors_keep_their_shape() -> None:
    flat = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [2, 2, 2],
                        "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}
    assert to_mlflow(flat, IMAGE) == {"inputs": [[[1.0, 2.0], [3.0, 4.0]],
                                                 [[5.0, 6.0], [7.0, 8.0]]]}
    nested = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 2, 2],
                          "data": [[[1, 2], [3, 4]]]}]}
    assert to_mlflow(nested, IMAGE) == {"inputs": [[[1.0, 2.0], [3.0, 4.0]]]}
    with pytest.raises(V2Error, match=r"shape \[2, 4\] does not fit the signature's \[-1, 2, 2\]"):
        to_mlflow({"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [2, 4],
                               "data": list(range(8))}]}, IMAGE)
    two = to_mlflow({"inputs": [{"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]},
                                {"name": "b", "datatype": "FP64", "shape": [2, 2],
                                 "data": [1, 2, 3, 4]}]}, TWO_TENSORS)
    assert two == {"inputs": {"a": [1, 2], "b": [[1.0, 2.0], [3.0, 4.0]]}}
    with pytest.raises(V2Error, match="missing inputs: b"):
        to_mlflow({"inputs": [{"name": "a", "datatype": "INT32", "shape": [1], "data": [1]}]},
                  TWO_TENSORS)


def test_without_a_signature_columns_or_tensors_by_shape() -> None:
    none = ModelMetadata(uri="x", version=None)
    assert to_mlflow({"inputs": [col("x", "FP64", [1.0, 2.0])]}, none) == {
        "dataframe_split": {"columns": ["x"], "data": [[1.0], [2.0]]}}
    assert to_mlflow({"inputs": [{"name": "t", "datatype": "INT64", "shape": [1, 2],
                                  "data": [1, 2]}]}, none) == {"inputs": [[1, 2]]}


def test_predictions_become_outputs() -> None:
    assert from_mlflow({"predictions": [0, 2]}, IRIS) == [
        {"name": "output-0", "datatype": "INT64", "shape": [2], "data": [0, 2]}]
    assert from_mlflow({"predictions": [[0.1, 0.2, 0.7]]}, IMAGE) == [
        {"name": "probs", "datatype": "FP32", "shape": [1, 3], "data": [0.1, 0.2, 0.7]}]
    records = from_mlflow({"predictions": [{"label": "a", "p": 0.5}, {"label": "b", "p": 1}]},
                          ModelMetadata(uri="x", version=None))
    assert records == [
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
        {"name": "p", "datatype": "FP64", "shape": [2], "data": [0.5, 1]}]
    by_key = from_mlflow({"predictions": {"flag": [True, False]}}, ModelMetadata(uri="x",
                                                                                 version=None))
    assert by_key == [{"name": "flag", "datatype": "BOOL", "shape": [2], "data": [True, False]}]
    ragged = from_mlflow({"predictions": [[1], [2, 3]]}, ModelMetadata(uri="x", version=None))
    assert ragged[0]["datatype"] == "BYTES" and ragged[0]["data"] == ["[1]", "[2, 3]"]


def test_requested_outputs_are_selected_and_unknown_ones_refused() -> None:
    outputs = from_mlflow({"predictions": {"a": [1], "b": [2]}}, ModelMetadata(uri="x",
                                                                               version=None))
    assert [o["name"] for o in select_outputs(outputs, {"outputs": [{"name": "b"}]})] == ["b"]
    assert select_outputs(outputs, {}) == outputs
    with pytest.raises(V2Error, match="unknown outputs: c"):
        select_outputs(outputs, {"outputs": [{"name": "c"}]})


# -- the direct path's fast translation (v2_fast): the general one's result, or None -------
IRIS_TENSOR = ModelMetadata(uri="m", version="5", inputs=[
    {"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1, 4]}}],
    outputs=[{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}])
NAMED = ModelMetadata(uri="m", version="6", inputs=[
    {"type": "tensor", "name": "x", "tensor-spec": {"dtype": "int64", "shape": [-1]}}],
    outputs=[{"type": "string", "name": "label"}])
NO_SIGNATURE = ModelMetadata(uri="x", version=None)
SIGNATURES = [IRIS, MIXED, IMAGE, TWO_TENSORS, IRIS_TENSOR, NAMED, NO_SIGNATURE]
DATATYPES = ["FP64", "FP32", "INT64", "INT32", "BOOL", "BYTES", "FP128"]
ODD_VALUES = [None, True, 2**70, -(2**64), "NaN", [1.0], 0, 1.5]


def same_json(a: bytes, b: bytes) -> bool:
    """Equal as JSON, integers and floats told apart (orjson and json write floats
    differently, e.g. 1e-05 and 0.00001; a runner and a V2 client read them the same)."""
    return json.dumps(json.loads(a)) == json.dumps(json.loads(b))


def random_value(rng: random.Random, datatype: str) -> Any:
    if rng.random() < 0.04:
        return rng.choice(ODD_VALUES)
    if datatype.startswith("FP"):
        return rng.choice([rng.uniform(-10, 10), 1e-7, 1e16, float(rng.randint(0, 5))])
    if datatype == "BOOL":
        return rng.random() < 0.5
    if datatype == "BYTES":
        return rng.choice(["a", "Ωmega", "", "x y"])
    return rng.randint(-3, 2**40)


def random_input(rng: random.Random, meta: ModelMetadata) -> dict[str, Any]:
    specs = model_metadata("m", None, meta)["inputs"] or [
        {"name": "c", "datatype": "FP64", "shape": [-1]}]
    spec = rng.choice(specs)
    datatype = spec["datatype"] if rng.random() < 0.85 else rng.choice(DATATYPES)
    rows = rng.randint(0, 3)
    shape = [rows if d == -1 else d for d in spec["shape"]]
    if rng.random() < 0.15:
        shape = rng.choice([[rows, 1], [rows, 2], [rows, 2, 2], [rows], [-1], [True], []])
    data: Any = [random_value(rng, datatype) for _ in range(math.prod(shape) if all(
        isinstance(d, int) and d >= 0 for d in shape) else 1)]
    if len(shape) == 2 and shape[1] and rng.random() < 0.8:  # nested as the shape, mostly
        data = [data[i:i + shape[1]] for i in range(0, len(data), shape[1])]
    if rng.random() < 0.05:
        data = data[:-1] if data else [1.0]
    name = spec["name"] if rng.random() < 0.9 else rng.choice(["other", "", "input-0"])
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def random_request(rng: random.Random, meta: ModelMetadata) -> dict[str, Any]:
    specs = model_metadata("m", None, meta)["inputs"]
    if specs and rng.random() < 0.7:  # every input of the signature, as a client sends them
        rows = rng.randint(0, 3)
        inputs = []
        for spec in specs:
            item = random_input(rng, meta)
            shape = [rows if d == -1 else d for d in spec["shape"]]
            values = [random_value(rng, spec["datatype"]) for _ in range(math.prod(shape))]
            if len(shape) == 2 and shape[1]:
                values = [values[i:i + shape[1]] for i in range(0, len(values), shape[1])]
            inputs.append(item if rng.random() < 0.1 else {**spec, "shape": shape,
                                                          "data": values})
    else:
        inputs = [random_input(rng, meta) for _ in range(rng.randint(1, 3))]
    request: dict[str, Any] = {"inputs": inputs}
    if rng.random() < 0.3:
        request["parameters"] = rng.choice([{}, {"content_type": "pd"}, {"threshold": 0.5},
                                            {"binary_data_output": False}, "x", None])
    if rng.random() < 0.2:
        request["id"] = rng.choice(["req-1", 7])
    return request


@pytest.mark.parametrize("meta", SIGNATURES, ids=lambda m: m.uri + str(m.version))
def test_the_fast_translation_of_a_request_is_the_general_one_or_none(
        meta: ModelMetadata) -> None:
    rng = random.Random(17)
    plan = plan_for(meta)
    fast_ones = 0
    for _ in range(600):
        body = json.dumps(random_request(rng, meta)).encode()
        fast = request_body(body, plan)
        try:
            general = mlflow_body(json.loads(body), meta)
        except V2Error:
            assert fast is None, body
            continue
        if fast is not None:
            fast_ones += 1
            assert fast[0] == json.loads(body) and same_json(fast[1], general), body
    # The plain cases do take it (rank 3 tensors never do).
    assert fast_ones >= 30 if meta is not IMAGE else fast_ones == 0, fast_ones


def test_the_fast_translation_leaves_what_orjson_reads_otherwise_to_json() -> None:
    plan = plan_for(IRIS)
    for data in (b"NaN", b"1e999", b'"\\ud800"', b"18446744073709551616"):
        body = b'{"inputs": [{"name": "sepal_length", "datatype": "FP64", "shape": [1], ' \
            b'"data": [%s]}]}' % data
        assert request_body(body, plan) is None
    typed = plan_for(NAMED)
    assert request_body(b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], '
                        b'"data": [18446744073709551616]}]}', typed) is None
    ok = b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], "data": [1, 2]}]}'
    assert request_body(ok, typed) == (json.loads(ok), b'{"inputs":{"x":[1,2]}}')


@pytest.mark.parametrize("predictions", [
    [0, 2], [0.5, 1], [1.5e-7, 2.0], [True, False], ["a", "b"], [[0.1, 0.9]], [], [0, None],
    {"a": [1]}, [{"label": "a"}], [2**64 + 1, 1], [float(2**63), 1.0], [18446744073709551615],
    [-(2**63) - 1], 3])
@pytest.mark.parametrize("meta", [IRIS, IMAGE, NAMED, NO_SIGNATURE, TWO_TENSORS],
                         ids=lambda m: m.uri + str(m.version))
@pytest.mark.parametrize("request_", [{}, {"id": "r", "outputs": [{"name": "output-0"}]},
                                      {"outputs": [{"name": "nope"}]}, {"id": 3}])
def test_the_fast_answer_is_the_general_one_or_none(predictions: Any, meta: ModelMetadata,
                                                    request_: dict[str, Any]) -> None:
    answer = json.dumps({"predictions": predictions}).encode()
    try:
        general: Any = v2_answer("m", "1", request_, json.loads(answer), meta)
    except V2Error as exc:
        general = exc
    try:
        fast: Any = answer_body("m", "1", request_, answer, plan_for(meta))
    except V2Error as exc:
        assert str(exc) == str(general)
        return
    if fast is not None:
        assert same_json(fast, json.dumps(general).encode())
    if predictions == [0, 2] and "nope" not in str(request_) and meta is not NAMED:
        assert fast is not None


PAIRS = {dtype: ModelMetadata(uri="m", version="7", inputs=[
    {"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": [-1, 2]}}])
    for dtype in ("float64", "int64")}


@pytest.mark.parametrize("data", [
    [[1.0, 2.0]], [[1.5, 2.0], [3.0, -4.25]], [[1e-7, -2.5e20], [-0.0, 5e-324]], [],
    [[1, 2], [-3, 4]], [[1.0, 2]], [[1.0, True]], [[1, False]], [[1.0, None]], [[1.0, "2"]],
    [[1.0], [2.0]], [[1.0, 2.0], [3.0]], [[1.0, [2.0]]], [[1.0, {"a": 1}]], [[2**64, 1]],
    [[1.0, 2.0, 3.0]], [1.0, 2.0]])
@pytest.mark.parametrize("dtype", ["float64", "int64"])
def test_a_table_of_numbers_is_sent_as_it_is_only_when_the_general_path_sends_it_so(
        data: list[Any], dtype: str) -> None:
    """Rank-2 numbers are checked on orjson's text (v2_fast._shaped): every odd value,
    ragged row or mistyped number must still take the general path (None here)."""
    meta, datatype = PAIRS[dtype], "FP64" if dtype == "float64" else "INT64"
    body = json.dumps({"inputs": [{"name": "t", "datatype": datatype,
                                   "shape": [len(data), 2], "data": data}]}).encode()
    fast = request_body(body, plan_for(meta))
    try:
        general: Any = mlflow_body(json.loads(body), meta)
    except V2Error:
        general = None
    if fast is not None:
        assert general is not None and same_json(fast[1], general)
    plain = {"float64": float, "int64": int}[dtype]
    if all(type(row) is list and len(row) == 2 and
           all(type(v) is plain and abs(v) < 2**63 for v in row)
           for row in data):  # the plain case does take it (orjson's range of integers)
        assert fast is not None, data


@pytest.mark.parametrize("answer", [
    b'{"predictions": [1, 2], "extra": [3]}', b'{"predictions": [NaN, 1.0]}',
    b'{"predictions": [Infinity]}', b'{"predictions": [1e+16, -2.5e-07, 3]}',
    b'{"predictions": [[1, 2]]}', b'{"predictions": ["1", 2]}', b'{"predictions": []}',
    b'{"predictions": [true, 1]}', b'[1, 2]'])
def test_the_answer_taken_as_mlflow_wrote_it_is_the_general_one(answer: bytes) -> None:
    """Flat numbers are copied from MLflow's text (v2_fast.answer_body); anything else
    there goes through a parse."""
    for request_, meta in itertools.product(({}, {"id": "r-1"}), (IRIS_TENSOR, NO_SIGNATURE)):
        fast = answer_body("m", "1", request_, answer, plan_for(meta))
        general = v2_answer("m", "1", request_, json.loads(answer), meta)
        assert fast is None or same_json(fast, json.dumps(general).encode()), answer


def test_a_large_table_is_checked_without_being_remembered() -> None:
    """The expected nesting of a table is kept only when small: a caller sending many
    large tables of distinct sizes cannot make the gateway hold them."""
    from gateway import v2_fast

    plan = plan_for(PAIRS["float64"])
    for rows in (3000, 3001):
        data = [[float(i), 0.5] for i in range(rows)]
        body = json.dumps({"inputs": [{"name": "t", "datatype": "FP64",
                                       "shape": [rows, 2], "data": data}]}).encode()
        fast = request_body(body, plan)
        assert fast is not None and same_json(fast[1], mlflow_body(json.loads(body),
                                                                   PAIRS["float64"]))
        assert (rows, 2, True) not in v2_fast._nestings
    assert request_body(body.replace(b"0.5]", b"1]", 1), plan) is None  # one int: general
