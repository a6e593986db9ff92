"""``GET /v1/loras``: the LoRA adapters requests may name (the ``*.safetensors`` files of ``--lora-dir``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from sd3serve.api.deps import ApiKeyDep, SettingsDep
from sd3serve.api.schemas import MAX_LORAS, ErrorResponse
from sd3serve.engine.lora_names import adapter_files, lora_dir

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
async def list_loras(key: ApiKeyDep, settings: SettingsDep) -> LoraList:
    files = await run_in_threadpool(adapter_files, lora_dir(settings))
    return LoraList(loras=[LoraInfo(name=n, bytes=p.stat().st_size) for n, p in files.items()])
