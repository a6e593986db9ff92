"""Interactive docs that work offline, and a published schema that says everything a client meets.

Swagger UI and ReDoc are served from the assets shipped in the ``fastapi-offline`` package (no CDN); the API keys
are security schemes, so Swagger UI's "Authorize" fills ``x-api-key`` (and ``x-admin-key``) for every call; every
response header, the 429 and 503 answers and /readyz's 503 are documented.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from sd3serve.api.errors import error_response

DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}

# Header name -> (security scheme, description). A route that takes one of these headers gets the scheme.
SECURITY_HEADERS = {
    "x-api-key": ("ApiKey", "Your API key (`sd3serve keys create`, or POST /admin/keys)"),
    "x-admin-key": ("AdminKey", "The admin key (SD3SERVE_ADMIN_KEY); enables /admin/..."),
}

_HEADERS: dict[str, tuple[str, str]] = {  # name -> (JSON Schema type, description)
    "x-request-id": ("string", "This request's id, also in the access log"),
    "x-remaining-credits": ("string", "The key's credits after this request's cost was set aside"),
    "x-cost": ("string", "Credits this request costs (price per image x images)"),
    "x-generation-time": ("string", "Seconds the generation took"),
    "x-seed-value": ("string", "The seed used (the drawn one when seed was -1); image i used seed + i"),
    "x-prompt-truncated": ("string", "`true` when the text encoders saw only the start of a prompt"),
    "Retry-After": ("integer", "Seconds to wait before retrying"),
    "x-rate-limit-reset-at-utc": ("string", "When this key's rate-limit window resets (ISO 8601, UTC)"),
    "Allow": ("string", "The methods this path answers"),
}
GENERATION_HEADERS = ("x-remaining-credits", "x-cost", "x-generation-time", "x-seed-value", "x-prompt-truncated")
SUBMIT_HEADERS = ("x-remaining-credits", "x-cost")
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}

router = APIRouter(include_in_schema=False)


def _header_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def document_api(spec: dict[str, Any]) -> None:
    """Security schemes instead of key parameters; response headers, 429, 503 and /readyz documented."""
    components = spec.setdefault("components", {})
    components["securitySchemes"] = {
        scheme: {"type": "apiKey", "in": "header", "name": header, "description": text}
        for header, (scheme, text) in SECURITY_HEADERS.items()
    }
    components["headers"] = {
        name: {"description": text, "schema": {"type": kind}} for name, (kind, text) in _HEADERS.items()
    }
    for path, operations in spec["paths"].items():
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
            if path.endswith("-txt2img"):  # the generation routes: credit headers, rate limit, overload
                wanted = GENERATION_HEADERS if path.startswith("/v1/") else SUBMIT_HEADERS
                ok = responses.setdefault("200", {"description": "OK"})
                ok.setdefault("headers", {}).update({h: _header_ref(h) for h in wanted})
                responses["429"] = {
                    "description": "Over this key's rate limit (SD3SERVE_RATE_LIMIT_PER_MINUTE); retry later",
                    "headers": {h: _header_ref(h) for h in ("x-rate-limit-reset-at-utc", "Retry-After")},
                    "content": _ERROR,
                }
                responses.setdefault("503", {"description": "Overloaded", "content": _ERROR})
                responses["503"]["headers"] = {"Retry-After": _header_ref("Retry-After")}
                responses["503"]["description"] += "; also while the model is still loading"
            if path == "/readyz":
                responses["503"] = {
                    "description": 'Not ready: `{"status": "loading"}` while the model loads and warms up, '
                    '`{"status": "unhealthy", "error"}` when the engine cannot serve',
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            for response in responses.values():  # every response carries its request id
                response.setdefault("headers", {})["x-request-id"] = _header_ref("x-request-id")
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


@router.get("/openapi.json")
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    return _unframed(
        get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{request.app.title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
        )
    )


@router.get("/docs/oauth2-redirect")
def swagger_ui_redirect() -> HTMLResponse:
    return _unframed(get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return _unframed(
        get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{request.app.title} - ReDoc",
            redoc_js_url="/docs/assets/redoc.standalone.js",
            redoc_favicon_url="/docs/assets/favicon.png",
            with_google_fonts=False,
        )
    )


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> Response:
    if name not in ASSET_TYPES:
        return error_response(404, "not found: no such path or model")
    headers = {"Cache-Control": "public, max-age=86400"}
    return FileResponse(DOCS_ASSETS / name, media_type=ASSET_TYPES[name], headers=headers)


def install_docs(app: FastAPI) -> None:
    """The docs routes; create the app with ``docs_url=None, redoc_url=None, openapi_url=None``."""
    app.include_router(router)
