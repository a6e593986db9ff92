"""The serving engine: a bounded queue in front of one model, with dynamic batching (after Ray Serve's batcher).

Every request gets its own future. The worker takes the oldest request, adds every queued request that can
share its forward pass (same ``batch_key``) up to ``max_batch_images``, waiting up to ``batch_wait_ms`` for
more, and runs them as one batch on a worker thread; an error goes to every future of the batch. Each
request's images are what it gets alone (its own seeds; bit-identical with ``exact_batches``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sd3serve.engine.acceleration import apply_acceleration
from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.engine.loading import LoadedModel, load_model
from sd3serve.engine.pipeline import SD3Pipeline, batch_key
from sd3serve.engine.protocol import Aborted, ProgressCallback
from sd3serve.errors import Overloaded, QueueTimeout
from sd3serve.settings import Settings

log = logging.getLogger(__name__)

BatchObserver = Callable[[int, float], None]  # (images in the batch, seconds it took)


@dataclass(eq=False)
class _Pending:
    job: GenerationJob
    request_id: str
    future: asyncio.Future[GenerationResult]
    progress: ProgressCallback | None
    enqueued: float = field(default_factory=time.monotonic)
    aborted: bool = False


class BatchingEngine:
    def __init__(
        self, settings: Settings, model: LoadedModel | None = None, *, on_batch: BatchObserver | None = None
    ) -> None:
        self.settings = settings
        self._model = model
        self._pipeline: SD3Pipeline | None = None
        # One thread runs the model: it is not re-entrant, and a second thread would only contend for the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd3-engine")
        self._queue: list[_Pending] = []
        self._running: dict[str, _Pending] = {}
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._ready = False
        self._on_batch = on_batch
        self._batch_avg_s = 1.0  # a running estimate, for Retry-After

    # --- Engine interface -----------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._ready

    @property
    def pipeline(self) -> SD3Pipeline:
        if self._pipeline is None:
            raise RuntimeError("engine not started")
        return self._pipeline

    @property
    def max_batch_images(self) -> int:
        if self.settings.max_batch_images:
            return self.settings.max_batch_images
        return 4 if self._model is not None and self._model.device.type == "cuda" else 1

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests running on the model now."""
        return len(self._running)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_and_warm)
        self._worker = asyncio.create_task(self._run_worker(), name="sd3-batcher")
        self._ready = True

    def _load_and_warm(self) -> None:
        model = self._model or load_model(self.settings)
        self._model = model
        apply_acceleration(model, self.settings)
        self._pipeline = SD3Pipeline(
            model,
            exact_batches=self.settings.exact_batches,
            prompt_cache_bytes=int(self.settings.prompt_cache_mb * 2**20),
            vae_tiling=self.settings.vae_tiling,
        )
        warm = GenerationJob(
            prompt="", negative_prompt="", steps=1, guidance_scale=1.0, seed=0, sampler="euler",
            scheduler="simple", width=256, height=256, batch_size=1,
        )  # fmt: skip
        self._pipeline(warm)
        log.info("engine ready: %s", model.source)

    async def generate(
        self, job: GenerationJob, *, request_id: str, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        if not self._ready:
            raise Overloaded("the model is still loading", retry_after_s=5)
        if len(self._queue) >= self.settings.max_queue:
            raise Overloaded(
                f"the queue is full ({self.settings.max_queue} requests waiting); retry later",
                retry_after_s=self._retry_after(),
            )
        pending = _Pending(job, request_id, asyncio.get_running_loop().create_future(), progress)
        self._queue.append(pending)
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._drop(pending)  # the caller went away: a queued request is dropped, a running one discarded
            raise

    async def abort(self, request_id: str) -> None:
        for p in [*self._queue, *self._running.values()]:
            if p.request_id == request_id:
                self._drop(p)
                if not p.future.done():
                    p.future.set_exception(Aborted(request_id))

    async def check_health(self) -> None:
        if not self._ready:
            raise RuntimeError("model not loaded yet")
        if self._worker is None or self._worker.done():
            raise RuntimeError("the batching worker has stopped")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(Overloaded("the server is shutting down", retry_after_s=5))
        self._queue.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # --- the worker ---------------------------------------------------------------------------------------

    def _drop(self, pending: _Pending) -> None:
        pending.aborted = True
        with contextlib.suppress(ValueError):
            self._queue.remove(pending)

    def _retry_after(self) -> int:
        waiting_batches = len(self._queue) / max(1, self.max_batch_images) + 1
        return max(1, round(waiting_batches * self._batch_avg_s))

    def _expire(self) -> None:
        """Fail requests that waited past the deadline: nothing was computed, nothing is charged."""
        now, deadline = time.monotonic(), self.settings.queue_timeout_s
        for p in [p for p in self._queue if now - p.enqueued > deadline]:
            self._queue.remove(p)
            if not p.future.done():
                p.future.set_exception(QueueTimeout(f"the request waited over {deadline:g} s in the queue"))

    def _take_batch(self) -> list[_Pending]:
        first = self._queue.pop(0)
        key, room = batch_key(first.job), self.max_batch_images - first.job.batch_size
        batch = [first]
        for p in list(self._queue):
            if room <= 0:
                break
            if batch_key(p.job) == key and p.job.batch_size <= room:
                self._queue.remove(p)
                batch.append(p)
                room -= p.job.batch_size
        return batch

    async def _run_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while True:
                self._expire()
                if not self._queue:
                    break
                # Give a lone request a moment for company that could share its forward pass.
                wait_s = self.settings.batch_wait_ms / 1000 - (time.monotonic() - self._queue[0].enqueued)
                if wait_s > 0 and len(self._queue) < self.max_batch_images:
                    await asyncio.sleep(wait_s)
                    continue
                batch = self._take_batch()
                await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        for p in batch:
            self._running[p.request_id] = p

        def progress(done: int, total: int) -> None:  # on the worker thread
            for p in batch:
                if p.progress is not None and not p.aborted:
                    p.progress(done, total)

        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self._executor, lambda: self.pipeline.generate_many([p.job for p in batch], progress=progress)
            )
        except Exception as e:
            log.exception("batch of %d requests failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        else:
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_exception(Aborted(p.request_id)) if p.aborted else p.future.set_result(r)
        finally:
            for p in batch:
                self._running.pop(p.request_id, None)
        elapsed = time.perf_counter() - start
        self._batch_avg_s = 0.8 * self._batch_avg_s + 0.2 * elapsed
        if self._on_batch is not None:
            self._on_batch(sum(p.job.batch_size for p in batch), elapsed)
