"""The asynchronous v2 API: submit, poll status (with progress), fetch the result and its images.

A task is held in the database with its owner key; the process that accepted it runs it on its engine and
writes the result there, so any server process sharing the database can answer for it. The credits are held
at submission (in the transaction that creates the task) and charged in the transaction that completes it; a
failed task costs nothing. Running it is the generation service's job (``api/service.py``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field

from sd3serve.api.body import read_json
from sd3serve.api.deps import (
    ApiKeyDep,
    GenerationKeyDep,
    IdempotencyKeyDep,
    RequestIdDep,
    ServiceDep,
    SettingsDep,
    StreamHubDep,
    TaskStoreDep,
)
from sd3serve.api.routes.common import GENERATION_ERRORS, MODEL_SLUG, cost_headers, request_body
from sd3serve.api.schemas import MAX_BATCH_SIZE, ErrorResponse, parse_txt2img, parse_webhook
from sd3serve.api.streams import HeldStreamingResponse
from sd3serve.settings import Settings
from sd3serve.store.tasks import CANCELLED, COMPLETED, FAILED, TaskStore, TaskView

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


class SubmitResponse(BaseModel):
    request_id: str
    status: str
    poll_url: str
    status_url: str
    response_url: str


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


def base_url(request: Request, settings: Settings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


@router.post(
    f"/v2/{MODEL_SLUG}",
    summary="Submit a generation (asynchronous)",
    openapi_extra=request_body("Txt2ImgRequestV2"),
    response_model=SubmitResponse,
    responses=GENERATION_ERRORS,
)
async def txt2img_v2(
    request: Request, key: GenerationKeyDep, service: ServiceDep, settings: SettingsDep, request_id: RequestIdDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:  # fmt: skip
    body = await read_json(request, limit=settings.max_body_bytes)
    req = parse_txt2img(body, single_image_body=False)  # one URL per image: batches need no base64 here
    base = base_url(request, settings)
    submitted = await service.submit(key, req, request_id=request_id, idempotency_key=idempotency_key,
                                     webhook=parse_webhook(body), base_url=base)  # fmt: skip
    status_url = f"{base}/v2/requests/{submitted.task_id}/status"
    body_out = SubmitResponse(
        request_id=submitted.task_id, status="QUEUED", poll_url=status_url, status_url=status_url,
        response_url=f"{base}/v2/requests/{submitted.task_id}",
    )  # fmt: skip
    headers = cost_headers(cost=submitted.cost, remaining=submitted.remaining, replayed=submitted.replayed)
    return JSONResponse(body_out.model_dump(), headers=headers)


def _status_body(task: TaskView) -> StatusResponse:
    progress = {"step": task.progress_step, "steps": task.progress_total} if task.progress_total else None
    return StatusResponse(request_id=task.id, status=task.status, progress=progress, error=task.error)


TASK_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "A path parameter is out of range"},
    401: {"model": ErrorResponse, "description": "Missing, unknown or revoked API key"},
    404: {"model": ErrorResponse, "description": "No such task for this key"},
}
STREAM_ERRORS: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorResponse, "description": "This key holds as many open streams (event streams, base64 result "
          "downloads) as it may (SD3SERVE_MAX_STREAMS_PER_KEY); retry after Retry-After seconds"},
    503: {"model": ErrorResponse, "description": "The server holds as many open streams as it allows "
          "(SD3SERVE_MAX_STREAMS); retry after Retry-After seconds"},
}


class CancelResponse(BaseModel):
    request_id: str
    status: str = Field(description="the task's status after the call: CANCELLED, or how it had already ended")
    cancelled: bool = Field(description="true if this call cancelled it; false if it had already ended")
    message: str


def result_body(task: TaskView, tasks: TaskStore, base: str) -> ResultResponse:
    """A task's result: its images (URLs, or base64 when it asked for that) once COMPLETED, else its state."""
    output: list[str] = []
    metrics: dict[str, float] = {}
    if task.status == COMPLETED:
        if task.base64:
            output = [base64.b64encode(data).decode("ascii") for data in tasks.images(task_id=task.id)]
        else:
            output = [f"{base}/v2/requests/{task.id}/images/{i}" for i in range(task.image_count)]
        metrics = {"inference_time": round(task.inference_time or 0.0, 4)}
    return ResultResponse(
        request_id=task.id, status=task.status, output=output, metrics=metrics, seed=task.seed, error=task.error
    )


def _task_answer(body: BaseModel, task: TaskView) -> JSONResponse:
    """A task's status or result: 200, or 422 once the task FAILED (the hosted API's convention)."""
    return JSONResponse(body.model_dump(exclude_none=True), status_code=422 if task.status == FAILED else 200)


def _task_route(path: str, summary: str, model: type[BaseModel], streams: bool = False) -> Any:
    return router.get(
        path, summary=summary, response_model=model, response_model_exclude_none=True,
        responses={422: {"model": model, "description": "The task FAILED"}, **TASK_ERRORS,
                   **(STREAM_ERRORS if streams else {})},
    )  # fmt: skip


@_task_route("/v2/requests/{task_id}/status", "Status of an asynchronous request", StatusResponse)
def task_status(task_id: TaskId, key: ApiKeyDep, tasks: TaskStoreDep) -> JSONResponse:
    task = tasks.get(task_id=task_id, key_id=key.id)
    return _task_answer(_status_body(task), task)


@_task_route("/v2/requests/{task_id}", "Result of an asynchronous request", ResultResponse, streams=True)
def task_result(
    task_id: TaskId, request: Request, key: ApiKeyDep, tasks: TaskStoreDep, settings: SettingsDep, hub: StreamHubDep
) -> Response:
    task = tasks.get(task_id=task_id, key_id=key.id)
    if task.status == COMPLETED and task.base64:
        slot = hub.open(key.id)  # a download of this size is a stream: counted against the key's streams
        return HeldStreamingResponse(base64_result(task, tasks, key.id, hub.reads), slot, media_type="application/json")
    body = result_body(task, tasks, base_url(request, settings))
    return _task_answer(body, task)


# Base64 results can be large (10 × 2048² PNGs ≈ 120 MB stored): they are read one image at a time (``reads`` bounds
# how many images are being read at once in the process) and written in pieces of BASE64_PIECE bytes. No shared slot
# is held while a piece waits for a slow reader, so one key's stalled downloads cannot delay another key's.
BASE64_PIECE = 3 * 2**18  # raw bytes per piece: 1 MiB of base64, whole base64 quanta (pieces concatenate)


async def base64_result(
    task: TaskView, tasks: TaskStore, key_id: int, reads: asyncio.Semaphore
) -> AsyncIterator[bytes]:
    """The same JSON as ``result_body``, written as it is read: one image in memory at a time."""
    head = {"request_id": task.id, "status": task.status}
    tail = {"metrics": {"inference_time": round(task.inference_time or 0.0, 4)}, "seed": task.seed}
    yield json.dumps(head)[:-1].encode() + b', "output": ['
    for i in range(task.image_count):
        async with reads:
            data, _ = await run_in_threadpool(tasks.image, task_id=task.id, key_id=key_id, index=i)
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
def task_image(task_id: TaskId, index: ImageIndex, key: ApiKeyDep, tasks: TaskStoreDep) -> Response:
    data, media_type = tasks.image(task_id=task_id, key_id=key.id, index=index)
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
