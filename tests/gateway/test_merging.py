"""Which requests merge, how, and how answers split (fast tier: no runners).

The end-to-end proof that merged answers are byte-identical is tests/test_batching.py;
here every rule is pinned down, including the requests that must go alone.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.merging import Payload, Unsplittable, compatible, merge, read, split

JSON = b"application/json"
CSV = b"text/csv"


def _json(doc: Any, content_type: bytes = JSON) -> Payload | None:
    return read(content_type, json.dumps(doc).encode())


def _split(data: list[Any], columns: list[str] | None = None, **extra: Any) -> Payload:
    value: dict[str, Any] = {"data": data}
    if columns is not None:
        value["columns"] = columns
    payload = _json({"dataframe_split": value, **extra})
    assert payload is not None
    return payload


def test_same_columns_and_kinds_share_a_key() -> None:
    a = _split([[1.0, 2.0]], ["a", "b"])
    b = _split([[3.5, 4.0], [0.5, 0.25]], ["a", "b"])
    assert a.key == b.key and (a.rows, b.rows) == (1, 2)
    merged = json.loads(merge(JSON, [a, b]))
    assert merged == {"dataframe_split": {"columns": ["a", "b"],
                                          "data": [[1.0, 2.0], [3.5, 4.0], [0.5, 0.25]]}}


@pytest.mark.parametrize("other", [
    {"dataframe_split": {"columns": ["a", "c"], "data": [[1.0, 2.0]]}},  # other columns
    {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2.0]]}},  # int, not float
    {"dataframe_split": {"columns": ["a", "b"], "data": [[True, 2.0]]}},  # bool
    {"dataframe_split": {"columns": ["a", "b"], "data": [[None, 2.0]]}},  # missing value
    {"dataframe_split": {"columns": ["a", "b"], "data": [[2**63, 2.0]]}},  # past int64
    {"dataframe_split": {"columns": ["a", "b"], "data": [[1.0, 2.0]]}, "params": {"k": 1}},
    {"dataframe_split": {"columns": ["a", "b"], "data": [[1.0, 2.0]], "index": [7]}},
    {"dataframe_records": [{"a": 1.0, "b": 2.0}]},  # another format
])
def test_requests_that_could_parse_differently_do_not_share_a_key(other: Any) -> None:
    payload = _json(other)
    assert payload is not None
    assert payload.key != _split([[1.0, 2.0]], ["a", "b"]).key


def test_content_type_is_part_of_the_key() -> None:
    doc = {"inputs": [[1.0, 2.0]]}
    assert _json(doc).key != _json(doc, b"application/json; charset=utf-8").key  # type: ignore[union-attr]


@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]", b'"text"', b"{}",
    b'{"inputs": [[1.0]], "instances": [[1.0]]}',  # two formats: MLflow's 400
    b'{"inputs": [[1.0]], "other": 1}',  # an unknown key beside the format
    b'{"inputs": []}',  # no rows
    b'{"inputs": [[1.0], [1.0, 2.0]]}',  # ragged rows
    b'{"inputs": 3}',
    b'{"inputs": {"a": [1.0], "b": [1.0, 2.0]}}',  # columns of different lengths
    b'{"inputs": {"a": 1.0}}',
    b'{"dataframe_records": [[1.0]]}',  # records that are not objects
    b'{"dataframe_records": [{"a": 1.0}, {"b": 1.0}]}',  # records with other keys
    b'{"dataframe_split": {"columns": ["a"], "data": [[1.0]], "dtype": "x"}}',
    b'{"dataframe_split": {"columns": [1], "data": [[1.0]]}}',
    b'{"dataframe_split": {"columns": ["a"], "data": [[1.0]], "index": [0, 1]}}',
    b'{"dataframe_split": {"columns": ["a"], "data": [[1.0]], "index": [[0]]}}',
    b'{"inputs": [[1.0]], "params": {"x": NaN}}',
])
def test_requests_served_alone(body: bytes) -> None:
    assert read(JSON, body) is None


def test_hostile_nesting_is_served_alone() -> None:
    assert read(JSON, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}") is None
    assert read(JSON, b'{"inputs": [' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"]}") \
        is None


def test_other_content_types_are_served_alone() -> None:
    assert read(b"application/vnd.apache.parquet", b"PAR1") is None
    assert read(b"text/plain", b"a\n1\n") is None


def test_columnar_inputs_merge_per_column() -> None:
    a = _json({"inputs": {"x": [1.0], "y": ["a"]}})
    b = _json({"inputs": {"x": [2.0, 3.0], "y": ["b", "c"]}})
    assert a is not None and b is not None and a.key == b.key and b.rows == 2
    assert json.loads(merge(JSON, [a, b])) == {"inputs": {"x": [1.0, 2.0, 3.0],
                                                          "y": ["a", "b", "c"]}}


def test_tensors_and_params_merge() -> None:
    a = _json({"instances": [[[1.0, 2.0]]], "params": {"t": 0.5}})
    b = _json({"instances": [[[3.0, 4.0]], [[5.0, 6.0]]], "params": {"t": 0.5}})
    assert a is not None and b is not None and a.key == b.key
    assert json.loads(merge(JSON, [a, b])) == {
        "instances": [[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]], "params": {"t": 0.5}}


def test_index_values_may_not_repeat_within_a_batch() -> None:
    a = _split([[1.0]], ["a"], )
    b = _json({"dataframe_split": {"columns": ["a"], "data": [[1.0]], "index": [0]}})
    c = _json({"dataframe_split": {"columns": ["a"], "data": [[2.0]], "index": [1]}})
    d = _json({"dataframe_split": {"columns": ["a"], "data": [[3.0]], "index": [0]}})
    assert b is not None and c is not None and d is not None
    assert a.key != b.key and b.key == c.key == d.key
    seen: set[Any] = set()
    assert compatible(seen, b) and compatible(seen, c) and not compatible(seen, d)
    assert json.loads(merge(JSON, [b, c]))["dataframe_split"]["index"] == [0, 1]


def test_csv_merges_under_one_header() -> None:
    a = read(CSV, b"a,b\n1.5,x\n")
    b = read(CSV, b"a,b\n2.5,y\n3.5,z\n")
    assert a is not None and b is not None and a.key == b.key and b.rows == 2
    assert merge(CSV, [a, b]) == b"a,b\n1.5,x\n2.5,y\n3.5,z\n"


@pytest.mark.parametrize("body", [
    b"a,b\n1,2.5\n",  # an int where the other has a float
    b"b,a\n1.5,x\n",  # another header
    b"a,b\nNA,x\n",  # a missing value
    b"a,b\n1.5,True\n",  # a boolean where the other has text
])
def test_csv_that_could_parse_differently_has_another_key(body: bytes) -> None:
    payload = read(CSV, body)
    assert payload is not None
    assert payload.key != read(CSV, b"a,b\n1.5,x\n").key  # type: ignore[union-attr]


@pytest.mark.parametrize("body", [
    b'a,b\n"1,5",x\n',  # quoting
    b"a,b\r\n1.5,x\r\n",  # carriage returns
    b"a,b\n1.5,x\n\n2.5,y\n",  # a blank line
    b"a,b\n1.5\n",  # a short row
    b"a,b\ninf,x\n",  # a float pandas reads, spelled unlike one
    b"a,b\n",  # no rows
    b"\xff,b\n1,2\n",  # not UTF-8
])
def test_csv_served_alone(body: bytes) -> None:
    assert read(CSV, body) is None


def test_split_gives_each_request_its_rows() -> None:
    a, b = _split([[1.0]], ["a"]), _split([[2.0], [3.0]], ["a"])
    answer = json.dumps({"predictions": [{"p": 0.25}, {"p": 1e-17}, {"p": float("nan")}]})
    assert split(answer.encode(), [a, b]) == [
        b'{"predictions": [{"p": 0.25}]}', b'{"predictions": [{"p": 1e-17}, {"p": NaN}]}']


@pytest.mark.parametrize(("answer", "reason"), [
    (b'{"predictions": [1]}', "row_count"),  # one prediction for two rows
    (b'{"predictions": [1, 2, 3]}', "row_count"),
    (b'{"predictions": {"a": [1, 2]}}', "unsplittable"),  # columns, not rows
    (b'{"predictions": [1, 2], "extra": 1}', "unsplittable"),
    (b'{"predictions":[1,2]}', "unsplittable"),  # not the encoding MLflow writes
    (b'[1, 2]', "unsplittable"),
    (b"not json", "unsplittable"),
])
def test_answers_that_do_not_split(answer: bytes, reason: str) -> None:
    with pytest.raises(Unsplittable) as caught:
        split(answer, [_split([[1.0]], ["a"]), _split([[2.0]], ["a"])])
    assert caught.value.reason == reason


def test_batching_config() -> None:
    config = parse_config("""
defaults: {batching: {max_batch_size: 32, max_wait: 5ms}}
endpoints:
  - {name: a, alias: x}
  - {name: b, alias: x, batching: false}
  - {name: c, alias: x, batching: {max_batch_size: 8}}
""")
    specs = {s.name: s.batching for s in config.endpoint_specs()}
    assert specs["a"] is not None and (specs["a"].max_batch_size, specs["a"].max_wait) == \
        (32, 0.005)
    assert specs["b"] is None
    assert specs["c"] is not None and (specs["c"].max_batch_size, specs["c"].max_wait) == \
        (8, 0.0)
    assert all(s.batching is None for s in parse_config(
        "endpoints: [{name: a, alias: x}]").endpoint_specs())


@pytest.mark.parametrize(("text", "error"), [
    ("defaults: {batching: {max_batch_size: 0}}", "defaults.batching.max_batch_size"),
    ("defaults: {batching: {max_wait: 2s}}", "defaults.batching.max_wait"),
    ("defaults: {batching: {size: 2}}", "defaults.batching.size: unknown key"),
    ("endpoints: [{name: a, alias: x, batching: {max_wait: soon}}]",
     "endpoints[0].batching.max_wait"),
])
def test_bad_batching_config_is_named(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert error in str(caught.value)
