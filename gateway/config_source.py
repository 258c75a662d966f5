"""From a config file's text to what pydantic validates, and back to key paths.

``${VAR}`` and ``${VAR:-default}`` expand in every string value (a whole-value reference
may become a number or a boolean); pydantic's errors become ``key.path[index]: message``
lines, the form every config error takes.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import ValidationError

# -- ${VAR} expansion ---------------------------------------------------------------------
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(node: Any, path: str, env: dict[str, str], errors: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: expand(v, _join(path, k), env, errors) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(v, f"{path}[{i}]", env, errors) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def sub(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        if name in env:
            return env[name]
        if default is not None:
            return default
        errors.append(f"{path or '<root>'}: environment variable {name} is not set "
                      f"and has no default")
        return ""

    expanded = _VAR.sub(sub, node)
    # A whole-value reference may produce a number or a boolean: let YAML type it.
    if _VAR.fullmatch(node.strip()) and expanded != "":
        typed = yaml.safe_load(expanded)
        if isinstance(typed, (int, float, bool)) or typed is None:
            return typed
    return expanded


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# -- pydantic errors → key paths ----------------------------------------------------------
def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "literal[", "constrained-")):
            out = _join(out, part)
    return out or "<root>"


def _message(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "greater_than_equal":
        return f"must be ≥ {ctx['ge']}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "less_than_equal":
        return f"must be ≤ {ctx['le']}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "string_pattern_mismatch":
        return "must not contain '/' or ':'"
    if kind == "value_error" and isinstance(ctx.get("error"), Exception):
        return str(ctx["error"])
    return str(err["msg"])


def key_path_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        out.append(f"{_loc(tuple(err['loc']))}: {_message(err)}")
    return list(dict.fromkeys(out))
