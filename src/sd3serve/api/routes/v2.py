"""The asynchronous v2 API: submit, poll status (with progress), fetch the result and its images.

A task is held in the database with its owner key; the process that accepted it runs it on its engine and
writes the result there, so any server process sharing the database can answer for it. The credits are held
at submission (in the transaction that creates the task) and charged in the transaction that completes it; a
failed task costs nothing. Running it is the generation service's job (``service/generation.py``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field

from sd3serve.api.contract import STREAM_ERRORS, TASK_ERRORS
from sd3serve.api.deps import ApiKeyDep, ReadsDep, ServiceDep, SettingsDep, StreamHubDep
from sd3serve.api.responses import HeldStreamingResponse
from sd3serve.api.routes.common import MODEL_SLUG, GenerationCallDep, asynchronous_route, base_url
from sd3serve.api.schemas import MAX_BATCH_SIZE, parse_txt2img, parse_webhook
from sd3serve.service import CANCELLED, COMPLETED, FAILED, KeyInfo, TaskReads, TaskView

router = APIRouter(tags=["async (v2)"])

TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what submission returns (32 hex digits); never a control character


def _task_id(value: str) -> str:
    if not TASK_ID.fullmatch(value):
        raise ValueError("not a request_id: 1-64 letters, digits, '-' or '_' (as returned at submission)")
    return value


TaskId = Annotated[
    str,
    Path(description="the request_id returned at submission", json_schema_extra={"pattern": f"^{TASK_ID.pattern}$"}),
    AfterValidator(_task_id),
]
ImageIndex = Annotated[int, Path(ge=0, lt=MAX_BATCH_SIZE, description="0-based index of the image in the batch")]


class StatusResponse(BaseModel):
    request_id: str
    status: str = Field(description="QUEUED, PROCESSING, COMPLETED, FAILED or CANCELLED")
    progress: dict[str, int] | None = Field(None, description="{step, steps} while PROCESSING")
    error: str | None = None


class ResultResponse(BaseModel):
    request_id: str
    status: str
    output: list[str] = Field(description="one absolute image URL per image, or base64 strings")
    metrics: dict[str, float] = Field(description="inference_time (s), ...")
    seed: int
    error: str | None = None


@asynchronous_route(router, f"/v2/{MODEL_SLUG}", "Submit a generation (asynchronous)", "Txt2ImgRequestV2")
async def txt2img_v2(call: GenerationCallDep) -> JSONResponse:
    body = await call.body()
    req = parse_txt2img(body, single_image_body=False)  # one URL per image: batches need no base64 here
    return await call.submit(req.order("v2", webhook=parse_webhook(body)))


def _status_body(task: TaskView) -> StatusResponse:
    progress = {"step": task.progress_step, "steps": task.progress_total} if task.progress_total else None
    return StatusResponse(request_id=task.id, status=task.status, progress=progress, error=task.error)


class CancelResponse(BaseModel):
    request_id: str
    status: str = Field(description="the task's status after the call: CANCELLED, or how it had already ended")
    cancelled: bool = Field(description="true if this call cancelled it; false if it had already ended")
    message: str


def result_body(task: TaskView, base: str) -> ResultResponse:
    """A task's result: its image URLs once COMPLETED, else its state (a base64 result is written piece by piece
    instead: ``base64_result``)."""
    output: list[str] = []
    metrics: dict[str, float] = {}
    if task.status == COMPLETED:
        output = [f"{base}/v2/requests/{task.id}/images/{i}" for i in range(task.image_count)]
        metrics = {"inference_time": round(task.inference_time or 0.0, 4)}
    return ResultResponse(
        request_id=task.id, status=task.status, output=output, metrics=metrics, seed=task.seed, error=task.error
    )


def _task_answer(body: BaseModel, task: TaskView) -> JSONResponse:
    """A task's status or result: 200, or 422 once the task FAILED (the hosted API's convention)."""
    return JSONResponse(body.model_dump(exclude_none=True), status_code=422 if task.status == FAILED else 200)


def _task_route(
    path: str, summary: str, model: type[BaseModel], streams: bool = False
) -> Any:  # pragma: no mutate block (runs at import)
    return router.get(
        path, summary=summary, response_model=model, response_model_exclude_none=True,
        responses={422: {"model": model, "description": "The task FAILED"}, **TASK_ERRORS,
                   **(STREAM_ERRORS if streams else {})},
    )  # fmt: skip


@_task_route("/v2/requests/{task_id}/status", "Status of an asynchronous request", StatusResponse)
async def task_status(task_id: TaskId, key: ApiKeyDep, reads: ReadsDep) -> JSONResponse:
    task = await reads.get(key, task_id)
    return _task_answer(_status_body(task), task)


@_task_route("/v2/requests/{task_id}", "Result of an asynchronous request", ResultResponse, streams=True)
async def task_result(
    task_id: TaskId, request: Request, key: ApiKeyDep, reads: ReadsDep, settings: SettingsDep, hub: StreamHubDep
) -> Response:
    task = await reads.get(key, task_id)
    if task.status == COMPLETED and task.base64:
        slot = hub.open(key.id)  # a download of this size is a stream: counted against the key's streams
        return HeldStreamingResponse(base64_result(task, reads, key, hub.reads), slot, media_type="application/json")
    return _task_answer(result_body(task, base_url(request, settings)), task)


# Base64 results can be large (10 × 2048² PNGs ≈ 120 MB stored): they are read one image at a time (``reads`` bounds
# how many images are being read at once in the process) and written in pieces of BASE64_PIECE bytes. No shared slot
# is held while a piece waits for a slow reader, so one key's stalled downloads cannot delay another key's.
BASE64_PIECE = 3 * 2**18  # raw bytes per piece: 1 MiB of base64, whole base64 quanta (pieces concatenate)


async def base64_result(
    task: TaskView, reads: TaskReads, key: KeyInfo, large_reads: asyncio.Semaphore
) -> AsyncIterator[bytes]:
    """The same JSON as ``result_body``, written as it is read: one image in memory at a time."""
    head = {"request_id": task.id, "status": task.status}
    tail = {"metrics": {"inference_time": round(task.inference_time or 0.0, 4)}, "seed": task.seed}
    yield json.dumps(head)[:-1].encode() + b', "output": ['
    for i in range(task.image_count):
        async with large_reads:
            data, _ = await reads.image(key, task.id, i)
        view = memoryview(data)
        yield (b", " if i else b"") + b'"'
        for start in range(0, len(view), BASE64_PIECE):
            yield base64.b64encode(view[start : start + BASE64_PIECE])
        yield b'"'
        del view, data
    yield b"], " + json.dumps(tail)[1:].encode()


@router.get(
    "/v2/requests/{task_id}/images/{index}",
    summary="One image of a finished asynchronous request",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}, **TASK_ERRORS},
)
async def task_image(task_id: TaskId, index: ImageIndex, key: ApiKeyDep, reads: ReadsDep) -> Response:
    data, media_type = await reads.image(key, task_id, index)
    return Response(content=data, media_type=media_type)


_CANCEL = {
    "summary": "Cancel an asynchronous request",
    "description": "A queued task is removed and a running one stops at its next step; either way it is CANCELLED "
    "and nothing is charged. Cancelling twice, or after the task ended, answers 200 with `cancelled: false`.",
    "response_model": CancelResponse,
    "responses": TASK_ERRORS,
}


@router.post("/v2/requests/{task_id}/cancel", **_CANCEL)  # type: ignore[arg-type]
@router.delete("/v2/requests/{task_id}", **_CANCEL)  # type: ignore[arg-type]
async def cancel_task(task_id: TaskId, key: ApiKeyDep, service: ServiceDep) -> CancelResponse:
    task, cancelled = await service.cancel(key, task_id)
    if cancelled:
        message = "cancelled; nothing was charged"
    elif task.status == CANCELLED:
        message = "already cancelled"
    else:
        message = f"the task had already ended ({task.status}); nothing changed"
    return CancelResponse(request_id=task.id, status=task.status, cancelled=cancelled, message=message)
