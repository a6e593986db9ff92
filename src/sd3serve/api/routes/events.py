"""``GET /v2/requests/{id}/events``: a v2 task's life as Server-Sent Events, from any server process.

Events: ``queued`` (``{"position"}`` when this process runs the task, else ``{}``), ``progress`` (``{"step",
"steps", "eta_s"}``), then one of ``completed`` (the body of ``GET /v2/requests/{id}``), ``failed`` or
``cancelled`` (``{"error"}``), after which the stream ends. Event ids grow with the task's progress (queued 0, step
k → k + 1, the end 1000), so a client that reconnects with ``Last-Event-ID`` gets only what it has not seen. The
stream follows the task's row in the database through the process's stream hub (``service/streams.py``: one poll for
all streams), so it works whichever process runs the task. Each stream holds one of its key's stream slots.

With ``?preview=true`` the progress events of a task run by this process also carry ``preview``: a small JPEG of
the current x0 estimate (``service/progress.py``), and the stream wakes at each new one, not only at the row's polls.
Previews are computed only while such a stream watches the task; without the parameter the stream is unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from sd3serve.api.contract import STREAM_ERRORS, TASK_ERRORS
from sd3serve.api.deps import ApiKeyDep, ReadsDep, ServiceDep, SettingsDep, StreamHubDep
from sd3serve.api.responses import HeldStreamingResponse
from sd3serve.api.routes.common import base_url
from sd3serve.api.routes.v2 import TaskId, base64_result, result_body
from sd3serve.errors import InvalidRequest
from sd3serve.service import CANCELLED, COMPLETED, FAILED, QUEUED, TaskProgress

router = APIRouter(tags=["async (v2)"])

KEEPALIVE_S = 15.0  # a comment line this often, so that proxies keep an idle stream open
END_ID = 1000
_FINAL = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled"}


def _event(event_id: int, name: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n"


LastEventId = Annotated[
    str,
    Header(alias="Last-Event-ID", max_length=20, json_schema_extra={"pattern": "^[0-9]*$"},
           description="the id of the last event received, to resume after it"),
]  # fmt: skip


PreviewParam = Annotated[
    bool,
    Query(description="add to each progress event a `preview`: the current x0 estimate of the task's first image as "
          "a small JPEG (`{step, width, height, media_type, image}`, `image` in base64; one pixel per latent cell, "
          "scaled up to 64 px at least), made by a linear latent-to-RGB map, not the VAE. Only where this server "
          "process runs the task; a progress event without a picture yet has none. Costs nothing while no stream "
          "asks for it."),
]  # fmt: skip


def resume_after(last_event_id: str | None) -> int:
    """The id after which a reconnecting client resumes (-1: from the start). The ids are this stream's own:
    decimal digits."""
    if not last_event_id:
        return -1
    if not (last_event_id.isascii() and last_event_id.isdigit()):
        raise InvalidRequest(
            f"header.Last-Event-ID: {last_event_id!a} is not an id of this stream (digits 0-9, 0 to {END_ID}); "
            "send the id of the last event received, or no Last-Event-ID to start from the beginning"
        )
    return int(last_event_id)


@router.get(
    "/v2/requests/{task_id}/events",
    summary="Live progress of an asynchronous request (Server-Sent Events)",
    response_class=StreamingResponse,  # for the documentation: a HeldStreamingResponse is one
    responses={200: {"content": {"text/event-stream": {}}, "description": "queued, progress, then completed, "
                     "failed or cancelled; ids grow with progress (resume with Last-Event-ID)"},
               **TASK_ERRORS, **STREAM_ERRORS},
)  # fmt: skip
async def task_events(
    task_id: TaskId, request: Request, key: ApiKeyDep, reads: ReadsDep, settings: SettingsDep, hub: StreamHubDep,
    service: ServiceDep, last_event_id: LastEventId = "", preview: PreviewParam = False,
) -> HeldStreamingResponse:  # fmt: skip
    seen = resume_after(last_event_id)
    first = await reads.get(key, task_id)  # 404 before the stream starts
    base = base_url(request, settings)
    slot = hub.open(key.id)  # 429 / 503 before the stream starts

    async def final_event(status: str) -> AsyncIterator[str | bytes]:
        task = await reads.get(key, task_id)
        head = f"id: {END_ID}\nevent: {_FINAL[status]}\ndata: "
        if status == COMPLETED and task.base64:  # the images, read and written piece by piece
            yield head
            async for piece in base64_result(task, reads, key, hub.reads):
                yield piece
            yield "\n\n"
        elif status == COMPLETED:
            yield _event(END_ID, "completed", result_body(task, base).model_dump(exclude_none=True))
        else:
            yield _event(END_ID, _FINAL[status], {"error": task.error})

    async def stream() -> AsyncIterator[str | bytes]:
        nonlocal seen
        watch = hub.watch(task_id, TaskProgress(status=first.status, step=first.progress_step,
                                                steps=first.progress_total))  # fmt: skip
        unwatch = service.previews.watch(task_id, watch.poke) if preview else None
        try:
            started: tuple[float, int] | None = None  # (time, step) of the first progress seen, for the ETA
            while (task := watch.latest) is not None:  # None: the task's row expired meanwhile
                if task.status in _FINAL:
                    if seen < END_ID:
                        async for part in final_event(task.status):
                            yield part
                    return
                step, steps, picture = task.step, task.steps, None
                if preview and (picture := service.previews.latest(task_id)) is not None and picture.step >= step:
                    step, steps = picture.step, picture.steps  # ahead of the row, which is written less often
                if task.status == QUEUED and seen < 0 and picture is None:
                    position = reads.position(task_id)
                    yield _event(0, "queued", {} if position is None else {"position": position})
                    seen = 0
                elif steps and step + 1 > seen:
                    now = time.monotonic()
                    if started is None:
                        started = (now, step)
                    rate = (step - started[1]) / (now - started[0]) if now > started[0] else 0.0
                    eta = round((steps - step) / rate, 1) if rate > 0 else None
                    data: dict[str, Any] = {"step": step, "steps": steps, "eta_s": eta}
                    if picture is not None and picture.step == step:
                        data["preview"] = picture.data()
                    yield _event(step + 1, "progress", data)
                    seen = step + 1
                if not await watch.changed(KEEPALIVE_S):
                    yield ": keep-alive\n\n"
        finally:
            watch.close()
            if unwatch is not None:
                unwatch()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no buffering in nginx
    return HeldStreamingResponse(stream(), slot, media_type="text/event-stream", headers=headers)
