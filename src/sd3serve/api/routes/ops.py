"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from sd3serve.api.deps import EngineDep, MetricsDep
from sd3serve.api.metrics import CONTENT_TYPE_LATEST

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the model is loaded and warmed up")
async def readyz(engine: EngineDep) -> JSONResponse:
    if not engine.is_ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    try:
        await engine.check_health()
    except Exception as e:
        return JSONResponse({"status": "unhealthy", "error": str(e)}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep, engine: EngineDep) -> Response:
    metrics.observe_engine(engine.stats())
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
