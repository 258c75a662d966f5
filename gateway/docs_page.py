"""``GET /docs``: Swagger UI on the gateway's ``/openapi.json``, with no CDN.

Swagger UI's files come from the ``swagger-ui-bundle-v2`` package (Swagger UI 5, which
reads OpenAPI 3.1) and are served from memory under ``/docs/assets/``; the page's own
script is ``static/docs.js``. A Content-Security-Policy keeps the page from loading
anything from elsewhere.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import json_error

TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".png": "image/png"}
SWAGGER_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")
HEADERS = {
    # Swagger UI sets inline styles; it runs no inline script and fetches only this origin.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; "
                               "style-src 'self' 'unsafe-inline'; connect-src 'self'; "
                               "img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mlflow-model-gateway: API</title>
<link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/docs.js"></script>
</body>
</html>
"""


def swagger_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

    return Path(str(swagger_ui_path))


class DocsPage:
    """The page and its assets, read once (on the first request) and kept in memory."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] | None = None

    def files(self) -> dict[str, bytes]:
        if self._files is None:
            where = swagger_dir()
            files = {name: (where / name).read_bytes() for name in SWAGGER_FILES}
            files["docs.js"] = (resources.files("gateway") / "static" / "docs.js").read_bytes()
            self._files = files
        return self._files

    async def page(self, request: Request) -> Response:
        # Relative asset URLs work under server.url_prefix: the page is <prefix>/docs.
        return Response(PAGE, media_type="text/html; charset=utf-8",
                        headers={**HEADERS, "Cache-Control": "no-cache"})

    async def asset(self, request: Request) -> Response:
        name = request.path_params["file"]
        data = self.files().get(name)
        if data is None:
            return json_error(404, "not_found", "no such route")
        return Response(data, media_type=TYPES[Path(name).suffix],
                        headers={**HEADERS, "Cache-Control": "max-age=86400"})

    def routes(self) -> list[Route]:
        return [Route("/docs", self.page, methods=["GET"]),
                Route("/docs/assets/{file}", self.asset, methods=["GET"])]
