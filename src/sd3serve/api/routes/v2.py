"""The asynchronous v2 API: submit, poll status (with progress), fetch the result and its images.

A task is held in the database with its owner key; the process that accepted it runs it on its engine and
writes the result there, so any server process sharing the database can answer for it. The credits are held
at submission and charged in the same transaction that completes the task; a failed task costs nothing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError

from sd3serve.api.body import read_json
from sd3serve.api.deps import (
    ApiKeyDep,
    EngineDep,
    GenerationKeyDep,
    MetricsDep,
    RequestIdDep,
    SettingsDep,
    StoreDep,
    TaskStoreDep,
)
from sd3serve.api.generation import generate_files
from sd3serve.api.metrics import Metrics
from sd3serve.api.routes.generate import ERRORS, MODEL_SLUG, credits_header, request_body
from sd3serve.api.schemas import ErrorResponse, Txt2ImgRequest, parse_txt2img
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.protocol import Engine
from sd3serve.errors import SD3ServeError
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditHold
from sd3serve.store.tasks import COMPLETED, FAILED, TaskStore, TaskView

log = logging.getLogger(__name__)

router = APIRouter(tags=["async (v2)"])

PROGRESS_WRITE_INTERVAL_S = 0.25  # progress reaches the database at most this often per task
PERSIST_ATTEMPTS = 60  # about 5 minutes of retries while the database is away


class SubmitResponse(BaseModel):
    request_id: str
    status: str
    poll_url: str
    status_url: str
    response_url: str


class StatusResponse(BaseModel):
    request_id: str
    status: str = Field(description="QUEUED, PROCESSING, COMPLETED or FAILED")
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
    openapi_extra=request_body("Txt2ImgRequest"),
    response_model=SubmitResponse,
    responses=ERRORS,
)
async def txt2img_v2(
    request: Request,
    key: GenerationKeyDep,
    store: StoreDep,
    tasks: TaskStoreDep,
    engine: EngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    request_id: RequestIdDep,
) -> JSONResponse:
    # One URL per image: batches need no base64 here.
    req = parse_txt2img(await read_json(request, limit=settings.max_body_bytes), single_image_body=False)
    job = req.to_job()
    cost = settings.price_per_image * job.batch_size
    hold = await run_in_threadpool(
        store.hold, key_id=key.id, credits=cost, request_id=request_id, owner=request.app.state.instance_id
    )
    try:
        await run_in_threadpool(
            tasks.create,
            task_id=request_id, key_id=key.id, seed=job.seed, base64=req.base64,
            media_type=req.image_format.media_type, request_json=req.model_dump_json(), hold=hold,
            owner=request.app.state.instance_id,
        )  # fmt: skip
    except Exception:
        await run_in_threadpool(store.release_or_defer, hold)
        raise
    runner = asyncio.create_task(
        run_task(engine, tasks, req, job, hold=hold, request_id=request_id, settings=settings, metrics=metrics,
                 cost=float(cost)),
        name=f"v2-{request_id}",
    )  # fmt: skip
    background: set[asyncio.Task[None]] = request.app.state.background
    background.add(runner)
    runner.add_done_callback(background.discard)

    base = base_url(request, settings)
    status_url = f"{base}/v2/requests/{request_id}/status"
    body_out = SubmitResponse(
        request_id=request_id, status="QUEUED", poll_url=status_url, status_url=status_url,
        response_url=f"{base}/v2/requests/{request_id}",
    )  # fmt: skip
    remaining = await run_in_threadpool(store.balance, key_id=key.id)
    return JSONResponse(body_out.model_dump(), headers={"x-remaining-credits": credits_header(remaining),
                                                        "x-cost": credits_header(float(cost))})  # fmt: skip


def progress_writer(tasks: TaskStore, task_id: str) -> Any:
    """A progress callback (called on the engine thread) that writes to the database, throttled."""
    last = [0.0]
    lock = threading.Lock()

    def on_progress(done: int, total: int) -> None:
        now = time.monotonic()
        with lock:
            if done not in (0, total) and now - last[0] < PROGRESS_WRITE_INTERVAL_S:
                return
            last[0] = now
        try:
            tasks.set_progress(task_id, step=done, total=total)
        except Exception:  # progress is best-effort: never fail a generation for it
            log.warning("task %s: could not record progress", task_id, exc_info=True)

    return on_progress


async def _persist(what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    """Write a task's outcome; if the database is away, keep trying (the images wait in memory)."""
    for attempt in range(PERSIST_ATTEMPTS):
        try:
            await run_in_threadpool(fn, *args, **kwargs)
            return
        except DBAPIError as e:
            if attempt == PERSIST_ATTEMPTS - 1:
                log.error("could not %s: %s", what, e)
                return
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))


async def run_task(
    engine: Engine, tasks: TaskStore, req: Txt2ImgRequest, job: GenerationJob, *, hold: CreditHold,
    request_id: str, settings: Settings, metrics: Metrics, cost: float,
) -> None:  # fmt: skip
    ttl = timedelta(seconds=settings.task_ttl_s)

    def fail(error: str) -> Any:
        return _persist(f"fail task {request_id}", tasks.fail, request_id, error=error, hold=hold, ttl=ttl)

    try:
        out = await generate_files(
            engine, req, job, request_id=request_id, metrics=metrics, progress=progress_writer(tasks, request_id)
        )
    except asyncio.CancelledError:
        await fail("the server shut down before the task finished; nothing was charged")
        raise
    except SD3ServeError as e:
        await fail(str(e))
        return
    except Exception:
        log.exception("task %s failed", request_id)
        await fail("internal error; nothing was charged")
        return
    await _persist(f"complete task {request_id}", tasks.complete, request_id, images=out.files,
                   inference_time=out.seconds, hold=hold, ttl=ttl)  # fmt: skip
    metrics.images.inc(job.batch_size)
    metrics.credits_charged.inc(cost)


def _status_body(task: TaskView) -> StatusResponse:
    progress = {"step": task.progress_step, "steps": task.progress_total} if task.progress_total else None
    return StatusResponse(request_id=task.id, status=task.status, progress=progress, error=task.error)


_TASK_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, unknown or revoked API key"},
    404: {"model": ErrorResponse, "description": "No such task for this key"},
}


@router.get(
    "/v2/requests/{task_id}/status",
    summary="Status of an asynchronous request",
    response_model=StatusResponse,
    response_model_exclude_none=True,
    responses={422: {"model": StatusResponse, "description": "The task FAILED"}, **_TASK_ERRORS},
)
def task_status(task_id: str, key: ApiKeyDep, tasks: TaskStoreDep) -> JSONResponse:
    task = tasks.get(task_id=task_id, key_id=key.id)
    return JSONResponse(
        _status_body(task).model_dump(exclude_none=True), status_code=422 if task.status == FAILED else 200
    )


@router.get(
    "/v2/requests/{task_id}",
    summary="Result of an asynchronous request",
    response_model=ResultResponse,
    response_model_exclude_none=True,
    responses={422: {"model": ResultResponse, "description": "The task FAILED"}, **_TASK_ERRORS},
)
def task_result(
    task_id: str, request: Request, key: ApiKeyDep, tasks: TaskStoreDep, settings: SettingsDep
) -> JSONResponse:
    task = tasks.get(task_id=task_id, key_id=key.id)
    output: list[str] = []
    metrics: dict[str, float] = {}
    if task.status == COMPLETED:
        if task.base64:
            output = [base64.b64encode(data).decode("ascii") for data in tasks.images(task_id=task.id)]
        else:
            base = base_url(request, settings)
            output = [f"{base}/v2/requests/{task.id}/images/{i}" for i in range(task.image_count)]
        metrics = {"inference_time": round(task.inference_time or 0.0, 4)}
    body = ResultResponse(
        request_id=task.id, status=task.status, output=output, metrics=metrics, seed=task.seed, error=task.error
    )
    return JSONResponse(body.model_dump(exclude_none=True), status_code=422 if task.status == FAILED else 200)


@router.get(
    "/v2/requests/{task_id}/images/{index}",
    summary="One image of a finished asynchronous request",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}, **_TASK_ERRORS},
)
def task_image(task_id: str, index: int, key: ApiKeyDep, tasks: TaskStoreDep) -> Response:
    data, media_type = tasks.image(task_id=task_id, key_id=key.id, index=index)
    return Response(content=data, media_type=media_type)
