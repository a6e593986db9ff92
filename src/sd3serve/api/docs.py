"""Interactive docs that work offline, and a published schema that says everything a client meets.

Swagger UI and ReDoc are served from the assets shipped in the ``fastapi-offline`` package (no CDN); the API keys
are security schemes, so Swagger UI's "Authorize" fills ``x-api-key`` (and ``x-admin-key``) for every call; every
response header is documented (the routes declare theirs from ``api/contract.py``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from sd3serve.api.contract import HEADERS, SECURITY_HEADERS, header_refs
from sd3serve.api.errors import error_response

DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}

router = APIRouter(include_in_schema=False)


def document_api(spec: dict[str, Any]) -> None:
    """What holds for every route: security schemes instead of key parameters, the documented headers as components
    (``api/contract.py``; routes declare which they send), a request id on every response."""
    components = spec.setdefault("components", {})
    components["securitySchemes"] = {
        scheme: {"type": "apiKey", "in": "header", "name": header, "description": text}
        for header, (scheme, text) in SECURITY_HEADERS.items()
    }
    components["headers"] = {
        name: {"description": text, "schema": {"type": kind}} for name, (kind, text) in HEADERS.items()
    }
    for operations in spec["paths"].values():
        for operation in operations.values():
            params = operation.get("parameters", [])
            keys = [p for p in params if p.get("in") == "header" and p["name"] in SECURITY_HEADERS]
            bearer = any(p.get("in") == "header" and p["name"].lower() == "authorization" for p in params)
            if keys and not bearer:  # routes that also take `Authorization` (OpenAI's style) document both as theirs
                operation["parameters"] = [p for p in params if p not in keys]
                if not operation["parameters"]:
                    del operation["parameters"]
                operation["security"] = [{SECURITY_HEADERS[p["name"]][0]: []} for p in keys]
            responses = operation.setdefault("responses", {})
            for response in responses.values():  # every response carries its request id
                response.setdefault("headers", {}).update(header_refs("x-request-id"))
    description = spec["info"].get("description", "")
    spec["info"]["description"] = (
        description + "\n\nEvery request carries its key in the `x-api-key` header (the **Authorize** button). "
        'Errors are JSON `{"error": "..."}`; a 405 names the allowed methods in `Allow`, a 413 says the limit. '
        "The playground is at [/](/)."
    ).strip()


# The documentation pages may not be shown inside another site's frame (clickjacking); their inline scripts
# (Swagger UI's, ReDoc's) are left as they are.
NO_FRAMING = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}


def _unframed(page: HTMLResponse) -> HTMLResponse:
    page.headers.update(NO_FRAMING)
    return page


_SWAGGER_UI: dict[str, Any] = {
    "openapi_url": "/openapi.json",
    "oauth2_redirect_url": "/docs/oauth2-redirect",
    "swagger_js_url": "/docs/assets/swagger-ui-bundle.js",
    "swagger_css_url": "/docs/assets/swagger-ui.css",
    "swagger_favicon_url": "/docs/assets/favicon.png",
    "swagger_ui_parameters": {"persistAuthorization": True, "displayRequestDuration": True},
}
_REDOC: dict[str, Any] = {
    "openapi_url": "/openapi.json",
    "redoc_js_url": "/docs/assets/redoc.standalone.js",
    "redoc_favicon_url": "/docs/assets/favicon.png",
    "with_google_fonts": False,
}


@router.get("/openapi.json")
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(title=f"{request.app.title} - Swagger UI", **_SWAGGER_UI)
    return _unframed(page)


@router.get("/docs/oauth2-redirect")
def swagger_ui_redirect() -> HTMLResponse:
    return _unframed(get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return _unframed(get_redoc_html(title=f"{request.app.title} - ReDoc", **_REDOC))


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> Response:
    if name not in ASSET_TYPES:
        return error_response(404, "not found: no such path or model")
    headers = {"Cache-Control": "public, max-age=86400"}
    return FileResponse(DOCS_ASSETS / name, media_type=ASSET_TYPES[name], headers=headers)


def install_docs(app: FastAPI) -> None:
    """The docs routes; create the app with ``docs_url=None, redoc_url=None, openapi_url=None``."""
    app.include_router(router)
