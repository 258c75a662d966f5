"""JSON error responses for Starlette routes, in the gateway's one error shape."""

from __future__ import annotations

from starlette.responses import JSONResponse


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None
               ) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def not_declared() -> JSONResponse:
    # Never echo the path back: the caller learns only that no such endpoint exists.
    return json_error(404, "endpoint_not_found", "no endpoint is declared with that name and alias")
