"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from sd3serve.api.contract import READINESS_RESPONSES
from sd3serve.api.deps import ServicesDep
from sd3serve.service import CONTENT_TYPE_LATEST

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the model is loaded and warmed up", responses=READINESS_RESPONSES)
async def readyz(services: ServicesDep) -> JSONResponse:
    ready, body = await services.readiness()
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.render_metrics(), media_type=CONTENT_TYPE_LATEST)
