"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from sd3serve.api.deps import EngineDep

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
