"""``GET /v2/requests/{id}/events``: a v2 task's life as Server-Sent Events, from any server process.

Events: ``queued`` (``{"position"}`` when this process runs the task, else ``{}``), ``progress`` (``{"step",
"steps", "eta_s"}``), then one of ``completed`` (the body of ``GET /v2/requests/{id}``), ``failed`` or
``cancelled`` (``{"error"}``), after which the stream ends. Event ids grow with the task's progress (queued 0, step
k → k + 1, the end 1000), so a client that reconnects with ``Last-Event-ID`` gets only what it has not seen. The
stream follows the task's row in the database (progress reaches it a few times a second), so it works whichever
process runs the task.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from sd3serve.api.deps import ApiKeyDep, EngineDep, SettingsDep, TaskStoreDep
from sd3serve.api.routes.v2 import TASK_ERRORS, TaskId, base_url, result_body
from sd3serve.store.tasks import CANCELLED, COMPLETED, FAILED, QUEUED, TaskView

router = APIRouter(tags=["async (v2)"])

POLL_S = 0.2  # how often the stream looks at the task's row
KEEPALIVE_S = 15.0  # a comment line this often, so that proxies keep an idle stream open
END_ID = 1000
_FINAL = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled"}


def _event(event_id: int, name: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n"


@router.get(
    "/v2/requests/{task_id}/events",
    summary="Live progress of an asynchronous request (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "queued, progress, then completed, "
                     "failed or cancelled; ids grow with progress (resume with Last-Event-ID)"}, **TASK_ERRORS},
)  # fmt: skip
async def task_events(
    task_id: TaskId, request: Request, key: ApiKeyDep, tasks: TaskStoreDep, engine: EngineDep, settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> StreamingResponse:  # fmt: skip
    first = await run_in_threadpool(tasks.get, task_id=task_id, key_id=key.id)  # 404 before the stream starts
    base = base_url(request, settings)

    async def stream() -> AsyncIterator[str]:
        # Ids this server sent are integers; anything else is not one of ours: start from the beginning.
        seen = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1
        task: TaskView = first
        started: tuple[float, int] | None = None  # (time, step) of the first progress seen, for the ETA
        quiet_since = time.monotonic()
        while True:
            if task.status in _FINAL:
                if seen < END_ID:
                    body = (result_body(task, tasks, base).model_dump(exclude_none=True) if task.status == COMPLETED
                            else {"error": task.error})  # fmt: skip
                    yield _event(END_ID, _FINAL[task.status], body)
                return
            if task.status == QUEUED and seen < 0:
                position = engine.position(task.id)
                yield _event(0, "queued", {} if position is None else {"position": position})
                seen, quiet_since = 0, time.monotonic()
            elif task.progress_total and task.progress_step + 1 > seen:
                now = time.monotonic()
                if started is None:
                    started = (now, task.progress_step)
                rate = (task.progress_step - started[1]) / (now - started[0]) if now > started[0] else 0.0
                eta = round((task.progress_total - task.progress_step) / rate, 1) if rate > 0 else None
                data = {"step": task.progress_step, "steps": task.progress_total, "eta_s": eta}
                yield _event(task.progress_step + 1, "progress", data)
                seen, quiet_since = task.progress_step + 1, now
            elif time.monotonic() - quiet_since > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(POLL_S)
            task = await run_in_threadpool(tasks.get, task_id=task.id, key_id=key.id)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no buffering in nginx
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

