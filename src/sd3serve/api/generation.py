"""What v1 and v2 share: run a validated request on the engine and encode its images."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from sd3serve.api.metrics import Metrics
from sd3serve.api.schemas import Txt2ImgRequest
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.protocol import Aborted, Engine, ProgressCallback
from sd3serve.errors import GenerationFailed, SD3ServeError
from sd3serve.imaging import encode_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generated:
    files: list[bytes]
    seconds: float
    prompt_truncated: bool


async def generate_files(
    engine: Engine,
    req: Txt2ImgRequest,
    job: GenerationJob,
    *,
    request_id: str,
    metrics: Metrics,
    progress: ProgressCallback | None = None,
) -> Generated:
    """The request's encoded images. Engine failures become GenerationFailed; domain errors pass through."""
    start = time.perf_counter()
    try:
        result = await engine.generate(job, request_id=request_id, progress=progress)
    except (SD3ServeError, Aborted):
        raise
    except Exception as e:
        raise GenerationFailed("image generation failed; nothing was charged") from e
    files = await run_in_threadpool(
        lambda: [encode_image(im, req.image_format, req.image_quality) for im in result.images]
    )
    seconds = time.perf_counter() - start
    metrics.generation_seconds.observe(seconds)
    if result.prompt_truncated:
        log.info("request %s: the prompt is longer than the text encoders' windows and was truncated", request_id)
    return Generated(files=files, seconds=seconds, prompt_truncated=result.prompt_truncated)


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def generate_unless_disconnected(
    request: Request, engine: Engine, req: Txt2ImgRequest, job: GenerationJob, *, request_id: str, metrics: Metrics
) -> Generated | None:
    """Like ``generate_files``, but None when the client goes away first (a queued request is then dropped)."""
    work = asyncio.create_task(generate_files(engine, req, job, request_id=request_id, metrics=metrics))
    watch = asyncio.create_task(until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return None
