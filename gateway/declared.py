"""Endpoints declared at run time: the admin API's ``/admin/deployments/{name}/{alias}``
(what ``mlflow deployments create|update|delete -t model-gateway`` calls).

They are kept in ``<state_dir>/endpoints.json`` (written whole, atomically) and declared
again when the gateway restarts; never in the config file, whose endpoints cannot be
changed or removed this way (409, naming where they are declared). Without ``state_dir``
they last until the gateway stops. A config reload keeps them: the reloader merges them
into every config it reads (:meth:`DeclaredEndpoints.merge`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .config import ConfigError, EndpointConfig, GatewayConfig
from .config_source import key_path_errors
from .errors import json_error

log = logging.getLogger("model_gateway.admin")

STATE_FILE = "endpoints.json"
MAX_BODY = 64 * 1024


class DeclaredEndpoints:
    def __init__(self, state_dir: str | None, config_path: str | None) -> None:
        self.path = Path(state_dir) / STATE_FILE if state_dir else None
        self.config_path = config_path or "the config"
        self.entries: dict[tuple[str, str], dict[str, Any]] = self._load()
        self.file: GatewayConfig | None = None  # the config file's own endpoints

    def _load(self) -> dict[tuple[str, str], dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return {}
        source = str(self.path)
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(source, [f"<file>: cannot read: {exc}"]) from exc
        items = raw.get("endpoints") if isinstance(raw, dict) else None
        if not isinstance(items, list):
            raise ConfigError(source, ["endpoints: must be a list"])
        entries, errors = {}, []
        for i, item in enumerate(items):
            try:
                ep = EndpointConfig.model_validate(item)
            except ValidationError as exc:
                errors += [f"endpoints[{i}].{e}" for e in key_path_errors(exc)]
                continue
            entries[(ep.name, ep.alias)] = ep.model_dump(exclude_defaults=True)
        if errors:
            raise ConfigError(source, errors)
        return entries

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"endpoints": list(self.entries.values())}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".endpoints-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data + "\n")
        os.replace(tmp, self.path)

    def merge(self, config: GatewayConfig) -> GatewayConfig:
        """``config`` (as read from its file) with the endpoints declared at run time; an
        endpoint the file declares too is the file's."""
        self.file = config
        own = {(e.name, e.alias) for e in config.endpoints}
        extra = []
        for key, entry in self.entries.items():
            if key in own:
                log.warning("endpoint %s/%s is declared in %s and in %s: the file's is "
                            "served", *key, self.config_path, self.path)
                continue
            extra.append(EndpointConfig.model_validate(entry))
        if not extra:
            return config
        return config.model_copy(update={"endpoints": [*config.endpoints, *extra]})

    def in_file(self, key: tuple[str, str]) -> int | None:
        endpoints = self.file.endpoints if self.file is not None else []
        return next((i for i, e in enumerate(endpoints) if (e.name, e.alias) == key), None)

    def default_taken(self, entry: dict[str, Any]) -> str | None:
        """Where another endpoint of the same name is already ``default: true``."""
        if not entry.get("default"):
            return None
        key = (entry["name"], entry["alias"])
        for i, e in enumerate(self.file.endpoints if self.file is not None else []):
            if e.default and e.name == key[0] and (e.name, e.alias) != key:
                return f"{self.config_path}, endpoints[{i}]"
        for other, entry_ in self.entries.items():
            if entry_.get("default") and other[0] == key[0] and other != key:
                return f"the endpoint {other[0]}/{other[1]} declared at run time"
        return None


class DeploymentsAPI:
    """The admin routes that declare, change and remove endpoints on a running gateway.

    ``refused`` is the admin API's token check; ``apply`` applies a config as a reload
    does and returns its summary.
    """

    def __init__(self, declared: DeclaredEndpoints,
                 refused: Callable[[Request], Response | None],
                 apply: Callable[[GatewayConfig], Awaitable[dict[str, Any]]],
                 status: Callable[[tuple[str, str]], dict[str, Any] | None]) -> None:
        self.declared = declared
        self.refused = refused
        self.apply = apply
        self.status = status

    async def change(self, request: Request) -> Response:
        refused = self.refused(request)
        if refused is not None:
            return refused
        key = (request.path_params["name"], request.path_params["alias"])
        label = f"{key[0]}/{key[1]}"
        declared = self.declared
        at = declared.in_file(key)
        if at is not None:
            return json_error(409, "declared_in_config", f"{label} is declared in "
                              f"{declared.config_path} (endpoints[{at}]): change it there")
        method = request.method
        if method == "POST" and key in declared.entries:
            return json_error(409, "endpoint_exists", f"{label} exists already: update it")
        if method != "POST" and key not in declared.entries:
            return json_error(404, "endpoint_not_found", f"no endpoint {label} was declared "
                              "at run time")
        if method == "DELETE":
            del declared.entries[key]
        else:
            entry = await self._entry(request, key)
            if isinstance(entry, Response):
                return entry
            taken = declared.default_taken(entry)
            if taken is not None:
                return json_error(409, "default_taken", f"model {key[0]} already has a "
                                  f"default endpoint ({taken})")
            declared.entries[key] = entry
        try:
            declared._save()
        except OSError as exc:
            declared.entries = declared._load()
            return json_error(500, "state_not_written", f"cannot write the state: "
                              f"{exc.strerror or exc}")
        assert declared.file is not None
        summary = await self.apply(declared.merge(declared.file))
        log.info("endpoint %s %s at run time", label,
                 {"POST": "declared", "PATCH": "changed", "DELETE": "removed"}[method])
        body = self.status(key) or {"name": key[0], "alias": key[1]}
        return JSONResponse({**body, "persisted": declared.path is not None,
                             "failed": summary.get("failed", {})},
                            status_code=201 if method == "POST" else 200)

    async def _entry(self, request: Request, key: tuple[str, str]
                     ) -> dict[str, Any] | Response:
        """The new entry from the request's body (``model_uri``, ``config``), checked."""
        body = await request.body()
        if len(body) > MAX_BODY:
            return json_error(413, "body_too_large", f"at most {MAX_BODY} bytes")
        try:
            given = json.loads(body)
        except (ValueError, RecursionError):
            return json_error(400, "bad_request", "the body must be a JSON object")
        if not isinstance(given, dict) or not set(given) <= {"model_uri", "config"} or \
                not isinstance(given.get("config", {}), dict):
            return json_error(400, "bad_request", "the body must be an object with "
                              "model_uri and an optional config object")
        config = given.get("config") or {}
        if {"name", "alias"} & set(config):
            return json_error(400, "bad_request", "config may not set name or alias")
        base = self.declared.entries.get(key, {}) if request.method == "PATCH" else {}
        entry = {**base, **config, "name": key[0], "alias": key[1]}
        if given.get("model_uri") is not None:
            entry["model_uri"] = given["model_uri"]
        if not entry.get("model_uri"):
            return json_error(400, "bad_request", "model_uri is required")
        try:
            ep = EndpointConfig.model_validate(entry)
        except ValidationError as exc:
            errors = [e if e.startswith(("name", "alias", "model_uri")) else f"config.{e}"
                      for e in key_path_errors(exc)]
            return JSONResponse({"error": {"code": "invalid_config", "message": "; ".join(
                errors), "errors": errors}}, status_code=400)
        return ep.model_dump(exclude_defaults=True) | {"name": ep.name, "alias": ep.alias}

    def routes(self) -> list[Route]:
        return [Route("/admin/deployments/{name}/{alias}", self.change,
                      methods=["POST", "PATCH", "DELETE"])]
