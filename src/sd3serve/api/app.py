"""The FastAPI application: HTTP on top of the running services (``service/runtime.py``), which its lifespan
starts and stops and keeps on ``app.state``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from sd3serve.api.docs import document_api, install_docs
from sd3serve.api.errors import install_error_handlers
from sd3serve.api.middleware import (
    HeadMiddleware,
    HostMiddleware,
    RequestBodyMiddleware,
    RequestContextMiddleware,
)
from sd3serve.api.routes import admin, credits, events, generate, img2img, loras, openai, ops, playground, v2
from sd3serve.api.routes import webhooks as webhooks_routes
from sd3serve.api.routes.img2img import IMAGE_INPUT_PATHS
from sd3serve.api.schemas import openapi_request_schemas
from sd3serve.service import Database, Engine, Metrics, running
from sd3serve.settings import Settings


def _document_400_not_422(spec: dict[str, Any]) -> None:
    """FastAPI documents its parameter errors as 422; this API answers them with 400 ``{"error"}``."""
    error = {
        "description": "Bad input",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for operation in (op for path in spec["paths"].values() for op in path.values()):
        responses = operation.get("responses", {})
        default_422 = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
        if default_422.get("$ref", "").endswith("/HTTPValidationError"):
            del responses["422"]
            responses.setdefault("400", error)


def _publish_request_schemas(app: FastAPI) -> None:
    """The generation routes read their bodies themselves (for the 413 and 400 rules): publish their schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(openapi_request_schemas())
            _document_400_not_422(spec)
            document_api(spec)
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: Settings,
    *,
    model_engine: Engine | None = None,
    database: Database | None = None,
    on_start_failure: Callable[[BaseException], None] | None = None,
    start_in_background: bool = True,
) -> FastAPI:
    """The app; ``model_engine`` and ``database`` may be given (tests), else they are built from the settings.

    With ``start_in_background`` HTTP answers while the model loads, and ``on_start_failure`` is called if it
    cannot be loaded (``serve`` stops the server then); without it the lifespan loads the model before the app
    takes requests, and a failed load fails the start (for hosts that route only to started apps)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services_running = running(settings, metrics=metrics, model_engine=model_engine, database=database,
                                   start_in_background=start_in_background, on_start_failure=on_start_failure)
        async with services_running as services:
            app.state.sd3 = services
            yield

    app = FastAPI(
        title="sd3serve",
        summary="Stable Diffusion 3.5 Turbo text-to-image, with the hosted API of Segmind",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # api/docs.py serves them, with local assets
    )
    install_error_handlers(app)
    install_docs(app)
    _publish_request_schemas(app)
    app.add_middleware(
        RequestBodyMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
        larger=dict.fromkeys(IMAGE_INPUT_PATHS, max(settings.max_body_bytes, settings.max_image_body_bytes)),
    )  # fmt: skip
    app.add_middleware(HeadMiddleware)
    app.add_middleware(HostMiddleware, public_url=settings.public_url)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # the last added is the outermost
    app.include_router(generate.router)
    app.include_router(v2.router)
    app.include_router(img2img.router)
    app.include_router(loras.router)
    app.include_router(events.router)
    app.include_router(webhooks_routes.router)
    app.include_router(openai.router)
    app.include_router(credits.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(playground.router)
    return app
