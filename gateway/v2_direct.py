"""V2Exchange: a V2 inference served from the server's callbacks, as ``direct.py`` serves
``/invocations``.

On the ASGI path a V2 inference cost the gateway about 1.8 times the CPU of the same
rows through ``/invocations``, almost all of it uvicorn's ASGI cycle rather than the
translation. The plain case takes the direct path instead: the endpoint is serving, its
signature is cached (``runners.signature``), the body is small and JSON, the caller may
call it. The request is translated in the callback that completes it (the plain shapes
most callers send by ``v2_fast``, in one pass; the rest by ``v2_codec``), written to an
idle runner connection, and the answer translated back in the callback that completes
it.

Anything else goes to the V2 handler on the ASGI path (``v2.OpenInference.infer``,
through the gateway's app), which answers it in full: before anything was sent, with
the caller's original body;
after the request went out (an error, the timeout, an answer too large to hold), by
reading the rest of the answer from that same connection (:meth:`V2Exchange._rest`).
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol
from urllib.parse import unquote

from runners import Endpoint, Runner, RunnerConnection, RunnerPool, TransportError
from runners.signature import ModelCatalog

from .direct import DirectExchange
from .errors import map_error
from .proxy import ModelProxy
from .request import SMALL_BODY, IncomingRequest
from .settings import ProxySettings
from .types import ASGIApp, Receive, Scope, Send
from .v2_codec import V2Error, mlflow_body, mlflow_message, v2_answer
from .v2_fast import Plan, answer_body, plan_for, request_body


class OpenInference(Protocol):
    """What of ``v2.OpenInference`` the direct path uses."""

    catalog: ModelCatalog
    pool: RunnerPool

    def endpoint(self, params: dict[str, Any]) -> Endpoint: ...

JSON = (b"content-type", b"application/json")
V2_INFER = "v2-infer"  # the action of a V2 inference route on the direct path


def parse_infer(raw_path: bytes, prefix: bytes) -> tuple[str, str, str] | None:
    """``<prefix>/v2/models/<name>[/versions/<alias>]/infer`` → (name, alias or "",
    V2_INFER), decoded; else None."""
    if prefix:
        if not raw_path.startswith(prefix + b"/"):
            return None
        raw_path = raw_path[len(prefix):]
    # "", "v2", "models", name, ["versions", alias,] "infer": split, as parse_route does
    parts = raw_path.split(b"?", 1)[0].split(b"/")
    if len(parts) == 7 and parts[4] == b"versions" and parts[5]:
        alias = parts[5].decode("latin-1")
    elif len(parts) == 5:
        alias = ""
    else:
        return None
    name = parts[3].decode("latin-1")
    if parts[0] or parts[1] != b"v2" or parts[2] != b"models" or not name or \
            parts[-1] != b"infer":
        return None
    return unquote(name) if "%" in name else name, \
        unquote(alias) if "%" in alias else alias, V2_INFER


# The runner is sent MLflow's protocol whatever the caller's headers said.
RUNNER_HEAD = b"POST /invocations HTTP/1.1\r\ncontent-type: application/json\r\nx-request-id: "
BINARY = b"\r\ninference-header-content-length: "  # binary tensors: the ASGI path refuses


def admit(v2: OpenInference, settings: ProxySettings, scope: Scope, name: str, alias: str
          ) -> tuple[Endpoint, IncomingRequest, Plan] | None:
    """(endpoint, request, the signature's plan) when a V2 inference may take the direct
    path, else None: the ASGI path answers every other case, refusals included."""
    if scope["method"] != "POST":
        return None
    if alias:  # as v2.endpoint() finds it, without its params and V2Error
        ep = v2.pool.endpoints.get((name, alias))
        if ep is None:
            return None
    else:
        try:
            ep = v2.endpoint({"name": name})
        except V2Error:
            return None
    meta = v2.catalog.cached(ep)
    if meta is None:
        return None
    request = IncomingRequest(scope, "invocations")
    length = request.content_length
    # The head holds every header the caller sent but the framing ones, each after a CRLF.
    if length is None or length > min(SMALL_BODY, settings.max_body_size) or \
            request.header_bytes > settings.max_header_size or BINARY in request.head or \
            not settings.policy.allows(ep.key, request.authorization):
        return None
    request.head = RUNNER_HEAD + request.request_id + b"\r\n"
    return ep, request, plan_for(meta)


def _answering(request: dict[str, Any]) -> dict[str, Any]:
    """What of a request its answer needs. Only that is kept while the runner works: the
    parsed inputs, freed at once, never survive into a collection of the garbage
    collector's youngest generation (which would then visit them)."""
    if "id" not in request and "outputs" not in request:
        return NOTHING
    return {key: request[key] for key in ("id", "outputs") if key in request}


NOTHING: dict[str, Any] = {}  # shared, never changed


class V2Exchange(DirectExchange):
    __slots__ = ("original", "plan", "v2_request")

    def __init__(self, connection: Any, proxy: ModelProxy, scope: Scope, ep: Endpoint,
                 request: IncomingRequest, plan: Plan, loop: Any) -> None:
        super().__init__(connection, proxy, scope, ep, request, loop)
        self.plan = plan
        self.original = b""
        self.v2_request: dict[str, Any] = NOTHING

    def dispatch(self) -> None:
        self.original = b"".join(self.chunks)
        fast = request_body(self.original, self.plan)
        if fast is not None:
            self.v2_request, self.body = _answering(fast[0]), fast[1]
            self.go()
            return
        try:
            decoded = json.loads(self.original)
            if not isinstance(decoded, dict):
                raise ValueError("not an object")
            self.body = mlflow_body(decoded, self.plan.meta)
        except (ValueError, RecursionError, V2Error):  # the ASGI path words the refusal
            self.connection.fall_back(*self.unsent())
            return
        self.v2_request = _answering(decoded)
        self.go()

    def unsent(self) -> tuple[ASGIApp, bytes]:
        # The gateway's app from its top: the url prefix, then the V2 handler.
        return self.proxy, self.original

    def no_connection(self) -> None:
        assert self.runner is not None
        self.proxy.pool.release(self.ep, self.runner)
        self.runner = None
        self.connection.fall_back(*self.unsent())

    def sent(self) -> tuple[ASGIApp, bytes]:
        return self._rest, self.original

    def _respond(self, conn: RunnerConnection, runner: Runner) -> bool:
        status, data = self._translate(conn.status, conn.peek_body(), runner)
        if not self.disconnected:
            self.connection.write_answer(
                status, [JSON, *self.proxy.identity(runner),
                         (b"x-request-id", self.request.request_id)], data,
                head_only=False, has_length=False)
        runner.client.finish(conn)
        self._finish(status)
        self.connection.finish()
        return True

    def _translate(self, status: int, answer: bytes, runner: Runner) -> tuple[int, bytes]:
        """The V2 answer for MLflow's ``status`` and ``answer``."""
        if status != 200:
            body: dict[str, Any] = {"error": mlflow_message(answer, status)}
        else:
            try:
                data = answer_body(self.ep.spec.name, runner.version, self.v2_request,
                                   answer, self.plan)
                if data is not None:
                    return status, data
                body = v2_answer(self.ep.spec.name, runner.version, self.v2_request,
                                 json.loads(answer), self.plan.meta)
            except V2Error as exc:  # e.g. an output the caller asked for by name is absent
                status, body = exc.status, {"error": str(exc)}
            except (ValueError, RecursionError):
                status, body = 502, {"error": "the runner's answer is not JSON"}
        return status, json.dumps(body, separators=(",", ":")).encode()

    async def _rest(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The rest of an exchange whose request went out: its answer (or its failure)
        read from the same connection, on the ASGI path."""
        runner = self.runner
        assert runner is not None
        status, extra = 500, [(b"x-request-id", self.request.request_id)]
        try:
            response = await runner.client.exchange(self.request, self.body, self.deadline,
                                                    sent=self.conn)
            async with response:
                answer = response.read_buffered() if response.complete else \
                    await response.read(max(self.deadline - time.monotonic(), 0.001))
                status, data = self._translate(response.status, answer, runner)
            extra = [*self.proxy.identity(runner), *extra]
        except TransportError as exc:
            status, _, message, more = map_error(exc, self.ep.label)
            data, extra = json.dumps({"error": message}).encode(), [*more, *extra]
        finally:
            self._finish(status)
        await send({"type": "http.response.start", "status": status,
                    "headers": [JSON, (b"content-length", b"%d" % len(data)), *extra]})
        await send({"type": "http.response.body", "body": data})
