"""The V2 inferences most callers send, translated in one pass (the direct path's).

Most V2 requests are a few rows as the signature describes them: one tensor of the
signature's shape and datatype, or one column per input, without model parameters. For
those, the general translation (``v2_codec``: parse, flatten, check each value, convert,
reshape, encode, and back) cost the gateway more CPU than proxying the same rows through
``/invocations``. Here the caller's nested lists, as orjson parsed them, are checked
with a few C-level passes and sent on as they are (a table of numbers on orjson's own
text of it, which the payload needs anyway); predictions that are a flat list of
numbers are copied from the text MLflow's scoring server wrote, without a parse.

A fast translation gives the payload and the answer ``v2_codec`` gives, or None, and the
general path then runs on the original bytes (and words any refusal): nothing is refused
here. That is what makes orjson safe to use, although it reads some JSON otherwise than
``json``: NaN, Infinity, numbers too large for a double and lone surrogates are errors
(so: None); integers beyond 64 bits become floats, which pass only where a float is
wanted (the general path makes the same float of them), never where an integer is, nor
in predictions (a float of magnitude 2**63 or more: None). orjson writes some floats
with other digits than ``json`` (``1e-05`` as ``0.00001``): the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import orjson

from runners.signature import ModelMetadata

from .v2_codec import (
    PLAIN,
    RESERVED_PARAMETERS,
    TRITON_PARAMETERS,
    is_tensor_schema,
    select_outputs,
    spec_datatype,
    spec_shape,
)

DROPPED = RESERVED_PARAMETERS | TRITON_PARAMETERS  # never sent on: no MLflow params
_INTS = frozenset({int})
_FLOATS = frozenset({float})
_NUMBERS = frozenset({int, float})
INT_LIMIT = 2**63  # orjson gives a float for an integer beyond 64 bits: never that large
PREDICTIONS = b'{"predictions": ['  # how MLflow's scoring server begins its answer
NUMBER_TEXT = b"0123456789-+.e, "  # what json.dumps writes of a list of numbers


class Plan:
    """What the fast path needs of one version's signature, worked out once
    (:func:`plan_for`): the tensors or columns it takes and the output it answers."""

    __slots__ = ("columns", "meta", "only", "output_name", "output_type", "parts", "payload",
                 "required", "tensors")

    def __init__(self, meta: ModelMetadata) -> None:
        self.meta = meta
        specs = meta.inputs or []
        # Tensors: name → (datatype, shape, plain types); one spec takes any input name.
        self.tensors: dict[str, tuple[str, list[int], frozenset[type]]] = {}
        self.only: tuple[str, list[int], frozenset[type]] | None = None
        # Columns: name → datatype (None: no signature, any column); required names.
        self.columns: dict[str, str] | None = None
        self.required: frozenset[str] = frozenset()
        # MLflow's payload for the request's ``inputs``, or None: the signature's kind.
        self.payload: Callable[[list[Any]], bytes | None] = self._columns
        if is_tensor_schema(specs):
            self.tensors = {str(s.get("name") or f"input-{i}"):
                            (spec_datatype(s), spec_shape(s), PLAIN[spec_datatype(s)])
                            for i, s in enumerate(specs)}
            self.payload = self._tensors
            if len(specs) == 1:
                self.only = next(iter(self.tensors.values()))
                if specs[0].get("name") is None:  # sent as {"inputs": nested}
                    self.payload = self._bare_tensor
        elif specs:
            named = [s for s in specs if s.get("name") is not None]
            self.columns = {str(s["name"]): spec_datatype(s) for s in named}
            self.required = frozenset(str(s["name"]) for s in named
                                      if s.get("required", True))
        outputs = meta.outputs or []
        spec = outputs[0] if len(outputs) == 1 else None
        self.output_name = str(spec["name"]) if spec is not None and spec.get("name") \
            else "output-0"
        self.output_type = spec_datatype(spec) if spec is not None else None
        self.parts: dict[tuple[str, str | None, str], tuple[bytes, bytes]] = {}

    def answer_parts(self, name: str, version: str | None, datatype: str
                     ) -> tuple[bytes, bytes]:
        """The bytes of an answer before its ``id`` and from there to its length, made
        and kept in ``parts``."""
        if len(self.parts) >= 64:  # names and datatypes are few: never reached in use
            self.parts.clear()
        parts = self.parts[name, version, datatype] = (
            b'{"model_name":%s,"model_version":%s' % (orjson.dumps(name),
                                                      orjson.dumps(version or "")),
            b',"outputs":[{"name":%s,"datatype":"%s","shape":[' % (
                orjson.dumps(self.output_name), datatype.encode()))
        return parts

    def _bare_tensor(self, items: list[Any]) -> bytes | None:
        item = items[0] if len(items) == 1 else None
        if type(item) is not dict:
            return None
        name, data = item.get("name"), item.get("data")
        wanted = self.only
        assert wanted is not None
        if type(name) is not str or not name or item.get("datatype") != wanted[0]:
            return None
        data = _shaped(data, item.get("shape"), wanted[1], wanted[2])
        return None if data is None else b'{"inputs":' + data + b"}"

    def _tensors(self, items: list[Any]) -> bytes | None:
        only, tensors = self.only, self.tensors
        if only is not None and len(items) != 1:
            return None
        given: dict[str, bytes] = {}
        for item in items:
            if type(item) is not dict:
                return None
            name = item.get("name")
            if type(name) is not str or not name or name in given:
                return None
            wanted = only or tensors.get(name)
            if wanted is None or item.get("datatype") != wanted[0]:
                return None
            data = _shaped(item.get("data"), item.get("shape"), wanted[1], wanted[2])
            if data is None:
                return None
            given[name] = data
        if len(given) != len(tensors):
            return None  # an input missing: the general path says which
        return b'{"inputs":{%s}}' % b",".join(orjson.dumps(n) + b":" + d
                                             for n, d in given.items())

    def _columns(self, items: list[Any]) -> bytes | None:
        columns = self.columns
        names: list[str] = []
        values: list[list[Any]] = []
        rows = -1
        for item in items:
            if type(item) is not dict:
                return None
            name, datatype = item.get("name"), item.get("datatype")
            data, shape = item.get("data"), item.get("shape")
            if type(name) is not str or not name or type(datatype) is not str or \
                    type(data) is not list or type(shape) is not list or \
                    (columns is not None and columns.get(name) != datatype):
                return None
            # [rows] or [rows, 1] of plain values, every column as many rows
            if rows == -1:
                rows = len(data)
            plain = PLAIN.get(datatype)
            if plain is None or len(data) != rows or not (
                    shape == [rows] or (shape == [rows, 1] and type(shape[1]) is int)) or \
                    type(shape[0]) is not int or not set(map(type, data)) <= plain:
                return None
            names.append(name)
            values.append(data)
        seen = set(names)
        if len(seen) != len(names) or not self.required <= seen:
            return None
        # orjson writes tuples as arrays: the rows need no lists of their own.
        return orjson.dumps({"dataframe_split": {"columns": names,
                                                 "data": list(zip(*values, strict=True))}})


def _shaped(data: Any, shape: Any, wanted: list[int], plain: frozenset[type]
            ) -> bytes | None:
    """``data`` as JSON when it is already nested as ``shape`` (rank 1 or 2, fitting the
    signature's ``wanted``), of ``plain`` values, else None. Its size is then at most the
    body's."""
    if type(data) is not list or type(shape) is not list or len(shape) != len(wanted):
        return None
    rows = shape[0] if shape else None
    if type(rows) is not int or rows != len(data) or (wanted[0] != -1 and wanted[0] != rows):
        return None
    if len(shape) == 1:
        return orjson.dumps(data) if set(map(type, data)) <= plain else None
    width = shape[1] if len(shape) == 2 else None
    if type(width) is not int or width < 0 or (wanted[1] != -1 and wanted[1] != width):
        return None
    floats = plain == _FLOATS
    if floats or plain == _INTS:
        # Numbers are checked on orjson's text, which the payload needs anyway: with its
        # digits and signs gone, a float leaves ".", "e" or ".e", an int nothing; the rest
        # (brackets, commas, any other value) must be exactly a rows × width nesting.
        text = orjson.dumps(data)
        left = text.translate(None, b"0123456789+-")
        if floats:
            left = left.replace(b".e", b".").replace(b"e", b".")
        return text if left == _nesting(rows, width, floats) else None
    try:  # list.__len__ refuses anything but a list: every row's type and width at once
        if data and set(map(list.__len__, data)) != {width}:
            return None
    except TypeError:
        return None
    return orjson.dumps(data) if set(map(type, chain.from_iterable(data))) <= plain else None


_nestings: dict[tuple[int, int, bool], bytes] = {}


def _nesting(rows: int, width: int, floats: bool) -> bytes:
    """What of a rows × width JSON array of numbers ``_shaped`` keeps: ``[[.,.],[.,.]]``
    for floats, ``[[,],[,]]`` for ints."""
    key = (rows, width, floats)
    nesting = _nestings.get(key)
    if nesting is None:
        row = b"[" + b",".join([b"." if floats else b""] * width) + b"]"
        nesting = b"[" + b",".join([row] * rows) + b"]"
        if len(nesting) <= 4096:  # kept for the few small tables callers send: at most
            if len(_nestings) >= 256:  # 1 MiB, whatever a caller sends
                _nestings.clear()
            _nestings[key] = nesting
    return nesting


def request_body(body: bytes, plan: Plan) -> tuple[dict[str, Any], bytes] | None:
    """(the parsed request, the runner's body) for a plain V2 request, else None."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(request) is not dict:
        return None
    items, params = request.get("inputs"), request.get("parameters")
    if type(items) is not list or not items or \
            (params is not None and (type(params) is not dict or not params.keys() <= DROPPED)):
        return None
    payload = plan.payload(items)
    return None if payload is None else (request, payload)


def answer_body(name: str, version: str | None, request: dict[str, Any], answer: bytes,
                plan: Plan) -> bytes | None:
    """The V2 answer's body for MLflow's ``answer`` when its predictions are a flat list
    of numbers, else None. Raises V2Error as ``v2_codec.select_outputs`` does."""
    if answer.startswith(PREDICTIONS) and answer.endswith(b"]}") and \
            request.get("outputs") is None:
        # MLflow's own encoding of a flat list of numbers, taken as it is: json.dumps
        # writes every float with "." or "e", never an int so.
        numbers = answer[len(PREDICTIONS):-2]
        if numbers and not numbers.translate(None, NUMBER_TEXT):
            datatype = plan.output_type or \
                ("FP64" if b"." in numbers or b"e" in numbers else "INT64")
            if datatype != "BYTES":
                return _answer(plan, name, version, request.get("id"), datatype,
                               numbers.count(b",") + 1, b"[" + numbers + b"]")
    try:
        parsed = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return None
    predictions = parsed.get("predictions", parsed) if type(parsed) is dict else parsed
    if type(predictions) is not list or not predictions:
        return None
    kinds = set(map(type, predictions))
    if kinds == _INTS:
        datatype = "INT64"
    elif kinds <= _NUMBERS and max(map(abs, predictions)) < INT_LIMIT:
        datatype = "FP64"
    else:
        return None
    datatype = plan.output_type or datatype
    if datatype == "BYTES":  # numbers as strings: the general path
        return None
    v2_id = request.get("id")
    if request.get("outputs") is not None:  # outputs asked for by name: checked in full
        body: dict[str, Any] = {"model_name": name, "model_version": version or ""}
        if type(v2_id) is str:
            body["id"] = v2_id
        body["outputs"] = select_outputs([{
            "name": plan.output_name, "datatype": datatype, "shape": [len(predictions)],
            "data": predictions}], request)
        return orjson.dumps(body)
    return _answer(plan, name, version, v2_id, datatype, len(predictions),
                   orjson.dumps(predictions))


def _answer(plan: Plan, name: str, version: str | None, v2_id: Any, datatype: str,
            size: int, data: bytes) -> bytes:
    """A V2 answer of one output; its fixed parts are made once per name, version and
    datatype: joined, they cost a fraction of encoding the whole answer as a dict."""
    head, tail = plan.parts.get((name, version, datatype)) or \
        plan.answer_parts(name, version, datatype)
    return b"".join((head, b',"id":' + orjson.dumps(v2_id) if type(v2_id) is str else b"",
                     tail, b"%d" % size, b'],"data":', data, b"}]}"))


_plans: dict[int, tuple[ModelMetadata, Plan]] = {}


def plan_for(meta: ModelMetadata) -> Plan:
    """The plan of ``meta``, made once per metadata object (the catalog keeps one per
    version); the cache holds ``meta`` too, so its id is not reused while cached."""
    cached = _plans.get(id(meta))
    if cached is not None and cached[0] is meta:
        return cached[1]
    if len(_plans) >= 256:  # versions come and go: never more than a few in use
        _plans.clear()
    plan = Plan(meta)
    _plans[id(meta)] = (meta, plan)
    return plan
