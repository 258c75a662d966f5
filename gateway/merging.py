"""Which prediction requests may share one predict call, how they merge, and how the
merged answer splits back into the answers each would have had alone.

MLflow stays the judge of the protocol: the runner parses the merged request with its
own parsers and serialises the merged answer with its own encoder. What is decided here
is only what cannot change any request's answer:

- Requests merge only when their payloads mean the same to MLflow's parsers once
  concatenated: the same content type, the same format and columns, the same ``params``,
  rows of one shape, and per column the same kinds of values (pandas and numpy infer a
  column's dtype from the kinds of its values: ints and floats together become floats,
  so a request of ints must not meet one of floats).
- An answer splits only when it is ``{"predictions": [...]}`` with one prediction per
  row of the merged request, and re-encoding what was parsed gives MLflow's bytes back:
  then each part, encoded the same way, is byte for byte what MLflow would have written
  for those rows alone. Anything else is a :class:`Unsplittable`, and the requests are
  served alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
MAX_LEAVES = 16384  # values per request worth inspecting; bigger requests are served alone
_INT64 = (-(2**63), 2**63)
_UINT64 = 2**64
# pandas.read_csv's default missing-value and boolean spellings.
_CSV_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                     "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                     "nan", "null"})
_CSV_BOOL = frozenset({"True", "TRUE", "true", "False", "FALSE", "false"})
_CSV_INT = re.compile(r"[+-]?[0-9]+")
_CSV_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(slots=True)
class Payload:
    """One request, read: requests with equal ``key`` may be merged."""

    key: tuple[Any, ...]
    rows: int
    data: Any  # the rows (a list), or per-key lists for columnar ``inputs``
    extra: Any = None  # dataframe_split: its columns; csv: its header line
    params: Any = None
    index: list[Any] | None = None  # dataframe_split's index, when it has one


class Unsplittable(Exception):
    """The merged answer cannot be split row for row; ``reason`` names why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read(content_type: bytes, body: bytes) -> Payload | None:
    """``body`` as a mergeable payload, or None when it must be served alone."""
    mime = content_type.split(b";", 1)[0].strip().lower()
    try:
        if mime == b"application/json":
            return _read_json(content_type, body)
        if mime == b"text/csv":
            return _read_csv(content_type, body)
    except RecursionError:  # nested deeper than Python's stack: MLflow answers it alone
        return None
    return None


def merge(content_type: bytes, parts: Sequence[Payload]) -> bytes:
    """The one request body that carries every part's rows, in order."""
    first = parts[0]
    kind = first.key[0]
    if kind == "csv":
        lines = [first.extra, *(line for p in parts for line in p.data)]
        return ("\n".join(lines) + "\n").encode()
    if kind == "inputs-columns":
        data: Any = {k: [v for p in parts for v in p.data[k]] for k in first.data}
    else:
        data = [row for p in parts for row in p.data]
    if kind == "dataframe_split":
        value: Any = {"columns": first.extra, "data": data} if first.extra is not None \
            else {"data": data}
        if first.index is not None:
            value["index"] = [i for p in parts for i in p.index or ()]
    else:
        value = data
    out = {"inputs" if kind == "inputs-columns" else kind: value}
    if first.params is not None:
        out["params"] = first.params
    return json.dumps(out).encode()


def split(answer: bytes, parts: Sequence[Payload]) -> list[bytes]:
    """Each part's answer, cut from the merged ``answer``; Unsplittable when it cannot be."""
    try:
        parsed = json.loads(answer)
    except ValueError:
        raise Unsplittable("unsplittable") from None
    if type(parsed) is not dict or len(parsed) != 1 or \
            type(predictions := parsed.get("predictions")) is not list:
        raise Unsplittable("unsplittable")
    if len(predictions) != sum(p.rows for p in parts):
        raise Unsplittable("row_count")
    if json.dumps(parsed).encode() != answer:  # not the encoding we would write
        raise Unsplittable("unsplittable")
    out, start = [], 0
    for part in parts:
        out.append(json.dumps({"predictions": predictions[start:start + part.rows]}).encode())
        start += part.rows
    return out


def compatible(batch_index: set[Any], part: Payload) -> bool:
    """Whether ``part``'s index values are new to a batch whose index holds
    ``batch_index`` (a merged dataframe must not repeat an index value); adds them."""
    if part.index is None:
        return True
    if batch_index.intersection(part.index):
        return False
    batch_index.update(part.index)
    return True


# -- JSON ---------------------------------------------------------------------------------
def _read_json(content_type: bytes, body: bytes) -> Payload | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # MLflow's own 400 comes from serving it alone
    if type(doc) is not dict:
        return None
    formats = [k for k in doc if k in FORMATS]
    if len(formats) != 1 or len(doc) - ("params" in doc) != 1:
        return None
    kind = formats[0]
    value, params = doc[kind], doc.get("params")
    try:
        params_key = json.dumps(params, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return None
    if kind == "dataframe_split":
        return _read_split(content_type, value, params, params_key)
    if kind == "inputs" and type(value) is dict:
        return _read_columns(content_type, value, params, params_key)
    if type(value) is not list:
        return None
    rows = _row_kinds(value)
    if rows is None or (kind == "dataframe_records" and type(value[0]) is not dict):
        return None
    return Payload((kind, content_type, params_key, rows), len(value), value, params=params)


def _read_split(content_type: bytes, value: Any, params: Any, params_key: str
                ) -> Payload | None:
    if type(value) is not dict or not set(value) <= {"columns", "data", "index"}:
        return None
    data, columns, index = value.get("data"), value.get("columns"), value.get("index")
    if type(data) is not list or (columns is not None and (
            type(columns) is not list or not all(type(c) is str for c in columns))):
        return None
    rows = _row_kinds(data)
    if rows is None:
        return None
    index_kinds: Hashable = None
    if index is not None:
        if type(index) is not list or len(index) != len(data):
            return None
        kinds = _row_kinds([[i] for i in index])
        if kinds is None or kinds[0] != ("L", (".",)):
            return None  # an index of lists or dicts: not worth the risk
        index_kinds = kinds[1]
    key = ("dataframe_split", content_type, params_key,
           tuple(columns) if columns is not None else None, rows, index_kinds)
    return Payload(key, len(data), data, extra=columns, params=params, index=index)


def _read_columns(content_type: bytes, value: dict[str, Any], params: Any,
                  params_key: str) -> Payload | None:
    """``{"inputs": {"a": [...], "b": [...]}}``: one list per input, one entry per row."""
    lengths = {len(v) for v in value.values() if type(v) is list}
    if not value or len(lengths) != 1 or len(value) != sum(type(v) is list
                                                           for v in value.values()):
        return None
    per_key = []
    for name, column in value.items():
        kinds = _row_kinds(column)
        if kinds is None:
            return None
        per_key.append((name, kinds))
    key = ("inputs-columns", content_type, params_key, tuple(per_key))
    return Payload(key, lengths.pop(), value, params=params)


def _row_kinds(rows: list[Any]) -> tuple[Hashable, tuple[frozenset[str], ...]] | None:
    """(the shape every row shares, per value position the set of value kinds), or None
    when the rows differ in shape, are empty, or are too many values to inspect."""
    if not rows:
        return None
    first: list[str] = []
    shape = _shape(rows[0], first)
    if len(first) * len(rows) > MAX_LEAVES:
        return None
    kinds = [{k} for k in first]
    for row in rows[1:]:
        leaves: list[str] = []
        if _shape(row, leaves) != shape:
            return None
        for seen, kind in zip(kinds, leaves, strict=True):
            seen.add(kind)
    return shape, tuple(frozenset(k) for k in kinds)


def _shape(value: Any, leaves: list[str]) -> Hashable:
    kind = type(value)
    if kind is list:
        return ("L", tuple(_shape(v, leaves) for v in value))
    if kind is dict:
        return ("D", tuple((k, _shape(v, leaves)) for k, v in value.items()))
    leaves.append(_kind(value))
    return "."


def _kind(value: Any) -> str:
    kind = type(value)
    if kind is int:
        return "i" if _INT64[0] <= value < _INT64[1] else "u" if 0 <= value < _UINT64 else "I"
    return {float: "f", str: "s", bool: "b"}.get(kind, "n")


# -- CSV ----------------------------------------------------------------------------------
def _read_csv(content_type: bytes, body: bytes) -> Payload | None:
    """Plain CSV only: no quoting, no carriage returns, no blank lines, one header line."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if '"' in text or "\r" in text:
        return None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) < 2 or len(lines) * len(lines[0]) > MAX_LEAVES * 8:
        return None
    header, data = lines[0], lines[1:]
    width = header.count(",") + 1
    kinds: list[set[str]] = [set() for _ in range(width)]
    for line in data:
        cells = line.split(",")
        if len(cells) != width or line == "":
            return None
        for seen, cell in zip(kinds, cells, strict=True):
            kind = _csv_kind(cell)
            if kind is None:
                return None
            seen.add(kind)
    key = ("csv", content_type, header, tuple(frozenset(k) for k in kinds))
    return Payload(key, len(data), data, extra=header)


def _csv_kind(cell: str) -> str | None:
    """The kind pandas reads ``cell`` as, or None when its reading is not plain."""
    if cell in _CSV_NA:
        return "n"
    if cell in _CSV_BOOL:
        return "b"
    if _CSV_INT.fullmatch(cell):
        return _kind(int(cell))
    if _CSV_FLOAT.fullmatch(cell):
        return "f"
    try:
        float(cell)  # "inf", " 1", "1_0": pandas may read these otherwise than they look
    except ValueError:
        return "s"
    return None
