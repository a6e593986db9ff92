"""``GET /v1/loras``: the LoRA adapters requests may name (the ``*.safetensors`` files of ``--lora-dir``)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from sd3serve.api.deps import ApiKeyDep, ServicesDep
from sd3serve.api.schemas import MAX_LORAS, ErrorResponse

router = APIRouter(tags=["adapters"])


class LoraInfo(BaseModel):
    name: str = Field(description='what requests put in "loras": [{"name": ..., "scale": ...}]')
    bytes: int = Field(description="the file's size")


class LoraList(BaseModel):
    loras: list[LoraInfo]
    max_per_request: int = MAX_LORAS


@router.get(
    "/v1/loras",
    summary="LoRA adapters this server offers",
    responses={401: {"model": ErrorResponse, "description": "Missing, unknown or revoked API key"}},
)
async def list_loras(key: ApiKeyDep, services: ServicesDep) -> LoraList:
    return LoraList(loras=[LoraInfo(name=name, bytes=size) for name, size in (await services.adapters()).items()])
