"""The playground at ``/``: one page (``api/static/``) that generates through the v2 API from a browser.

No CDN and no build step: plain HTML, CSS and JavaScript shipped in the package. The page reads the request's
fields, limits and presets from ``/playground/config.json``, built here from the request schemas, so a limit
exists in one place. With a start image the page sends an image-to-image request; adapters come from
``GET /v1/loras``; while a request runs it shows the live previews of its event stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.routing import Match

from sd3serve.api.deps import SettingsDep
from sd3serve.api.errors import error_response
from sd3serve.api.routes.common import MODEL_SLUG
from sd3serve.api.routes.img2img import IMG2IMG_SLUG
from sd3serve.api.schemas import ASPECT_RATIOS, MAX_LORAS, SIZE_MULTIPLE, Img2ImgRequest, Txt2ImgRequest

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
# A page that needs nothing from elsewhere says so: the browser refuses anything not from this server.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
EVENTS_PATH = "/v2/requests/{task_id}/events"  # server-sent progress, where the server has it
SEED_PROMPT = (
    "A panda in a glowing tech-infused jacket, standing in front of a bustling cyberpunk market, his T-shirt "
    "displaying 'Segmind'. Neon lights illuminate his face, with a futuristic cityscape behind him. Reflections "
    "shimmer on the wet pavement."
)
DEMO_PROMPT = "a red circle on a blue background"
DEMO_GRAMMAR = "a[n] [small|large] <colour> <shape> [at the <position>] [on a[n] <colour> background]"


def request_fields(model: type[BaseModel] = Txt2ImgRequest) -> dict[str, dict[str, Any]]:
    """Each field of the request body: type, default, limits, allowed names, description (``$ref`` resolved)."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    fields = {}
    for name, prop in schema["properties"].items():
        ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("allOf", []) if "$ref" in p), None)
        resolved = {**defs[ref.rsplit("/", 1)[1]], **prop} if ref else prop
        fields[name] = {
            k: resolved[k]
            for k in ("type", "default", "minimum", "maximum", "minLength", "maxLength", "enum", "description")
            if k in resolved
        }
    return fields


def has_route(app: FastAPI, path: str) -> bool:
    """Whether some route answers GET ``path``: asked of the routes themselves, since the app's list holds included
    routers, which have no path of their own."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    return any(route.matches(scope)[0] is Match.FULL for route in app.routes)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html", headers={"Content-Security-Policy": CSP})


@router.get("/playground/config.json")
def config(request: Request, settings: SettingsDep) -> dict[str, Any]:
    demo = settings.model is None
    return {
        "fields": request_fields(),
        "img2img_fields": {"strength": request_fields(Img2ImgRequest)["strength"]},
        "max_image_bytes": settings.max_image_bytes,
        "max_loras": MAX_LORAS,
        "aspect_ratios": ASPECT_RATIOS,
        "size_multiple": SIZE_MULTIPLE,
        "price_per_image": float(settings.price_per_image),
        "demo_model": demo,
        "example_prompt": DEMO_PROMPT if demo else SEED_PROMPT,
        "prompt_grammar": DEMO_GRAMMAR if demo else None,
        "paths": {
            "v1": f"/v1/{MODEL_SLUG}",
            "v2": f"/v2/{MODEL_SLUG}",
            "img2img_v1": f"/v1/{IMG2IMG_SLUG}",
            "img2img_v2": f"/v2/{IMG2IMG_SLUG}",
            "loras": "/v1/loras",
            "credits": "/v1/get-user-credits",
            # Progress by server-sent events when the server has the route, else the page polls status_url.
            "events": EVENTS_PATH if has_route(request.app, EVENTS_PATH.format(task_id="0")) else None,
        },
    }


@router.get("/playground/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        return error_response(404, "not found: no such path or model")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
