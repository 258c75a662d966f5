"""V2 (Open Inference Protocol) ↔ MLflow translation, from signatures as MLflow writes them."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.v2_codec import (
    V2Error,
    from_mlflow,
    model_metadata,
    select_outputs,
    to_mlflow,
)
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
