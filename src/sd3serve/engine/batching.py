"""The serving engine: a bounded queue in front of one model, with dynamic batching (after Ray Serve's batcher).

Every request gets its own future. The worker takes the oldest request, adds every queued request that can
share its forward pass (same ``batch_key``) up to ``max_batch_images``, waiting up to ``batch_wait_ms`` for
more, and runs them as one batch on the model's thread; an error goes to every future of the batch, and the
worker goes on with the next one. A request with more images than a batch holds runs a batch's worth at a time
and goes back to the end of the queue in between, so small requests are not stuck behind a large one. Each
request's images are what it gets alone (its own seeds; bit-identical with ``exact_batches``). A request whose
caller is gone (cancelled, disconnected) stops at the next step; a request still queued at its deadline fails
then, even while a long batch runs.

With ``model_workers`` N > 1 N workers take batches from the one
queue, each running its own pipeline on its own thread; they share the model's weights and the prompt cache. A
request's images do not depend on which worker made them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.pipeline import AllAborted, SD3Pipeline, batch_key, build_pipeline
from sd3serve.engine.previews import PreviewHook
from sd3serve.engine.protocol import Aborted, EngineStats, PreviewListener, ProgressCallback
from sd3serve.errors import Overloaded, QueueTimeout
from sd3serve.settings import Settings

log = logging.getLogger(__name__)

BatchObserver = Callable[[int, float], None]  # (images in the batch, seconds it took)
WARM_UP = GenerationJob(
    prompt="", negative_prompt="", steps=1, guidance_scale=1.0, seed=0, sampler="euler", scheduler="simple",
    width=256, height=256, batch_size=1,
)


@dataclass(eq=False)
class _Pending:
    job: GenerationJob
    request_id: str
    future: asyncio.Future[GenerationResult]
    progress: ProgressCallback | None
    enqueued: float = field(default_factory=time.monotonic)
    aborted: bool = False  # read by the model's thread before every model call
    deadline: asyncio.TimerHandle | None = None
    done: GenerationResult = field(default_factory=lambda: GenerationResult(images=[]))  # images made so far

    @property
    def remaining(self) -> int:
        return self.job.batch_size - len(self.done.images)

    def chunk(self, room: int) -> GenerationJob:
        """The next images of this request that fit in ``room``: image i keeps seed + i."""
        made = len(self.done.images)
        return dataclasses.replace(self.job, seed=self.job.seed + made, batch_size=min(self.remaining, room))

    def add(self, part: GenerationResult) -> None:
        self.done.images.extend(part.images)
        self.done.prompt_truncated |= part.prompt_truncated
        for k, v in part.timings.items():
            self.done.timings[k] = self.done.timings.get(k, 0.0) + v


class BatchingEngine:
    def __init__(
        self, settings: Settings, model: LoadedModel | None = None, *, on_batch: BatchObserver | None = None
    ) -> None:
        self.settings = settings
        self._model = model
        self._pipeline: SD3Pipeline | None = None
        # One thread per model worker runs its pipeline (a pipeline is not re-entrant); the first also loads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd3-engine")
        self._executors = [self._executor]
        self._queue: list[_Pending] = []
        self._running: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._ready = False
        self._on_batch = on_batch
        self._batch_avg_s = 1.0  # a running estimate, for Retry-After
        self._batches = self._failed_batches = self._aborted = 0

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

    def stats(self) -> EngineStats:
        cache = self._pipeline.prompt_cache if self._pipeline is not None else None
        return EngineStats(
            ready=self._ready, queued=len(self._queue), running=len(self._running), batches=self._batches,
            failed_batches=self._failed_batches, aborted=self._aborted,
            prompt_cache_hits=cache.hits if cache else 0, prompt_cache_misses=cache.misses if cache else 0,
            prompt_cache_entries=len(cache) if cache else 0, prompt_cache_bytes=cache.nbytes if cache else 0,
        )  # fmt: skip

    def position(self, request_id: str) -> int | None:
        return next((i for i, p in enumerate(self._queue) if p.request_id == request_id), None)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_and_warm)
        pipelines: list[SD3Pipeline | None] = [None]  # the first worker runs self.pipeline
        for i in range(1, self.workers):
            assert self._pipeline is not None
            worker = self._pipeline.worker()
            pipelines.append(worker)
            self._executors.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sd3-engine-{i}"))
            await loop.run_in_executor(self._executors[-1], worker, WARM_UP)  # this thread's pools
        self._workers = [
            asyncio.create_task(self._run_worker(pipe, executor), name=f"sd3-batcher-{i}")
            for i, (pipe, executor) in enumerate(zip(pipelines, self._executors, strict=True))
        ]
        self._ready = True

    @property
    def workers(self) -> int:
        """Model workers: batches that run at once."""
        threads = self._pipeline.threads if self._pipeline is not None else None
        return threads.workers if threads is not None else 1

    def _load_and_warm(self) -> None:
        self._pipeline = build_pipeline(self.settings, self._model)
        self._model = self._pipeline.model
        self._pipeline(WARM_UP)
        log.info("engine ready: %s", self._model.source)

    def admit(self) -> None:
        if not self._ready:
            raise Overloaded("the model is still loading", retry_after_s=5)
        if len(self._queue) >= self.settings.max_queue:
            raise Overloaded(
                f"the queue is full ({self.settings.max_queue} requests waiting); retry later",
                retry_after_s=self._retry_after(),
            )

    async def generate(
        self, job: GenerationJob, *, request_id: str, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        self.admit()
        loop = asyncio.get_running_loop()
        pending = _Pending(job, request_id, loop.create_future(), progress)
        pending.deadline = loop.call_later(self.settings.queue_timeout_s, self._expire, pending)
        self._queue.append(pending)
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._abort(pending)  # the caller went away: a queued request is dropped, a running one stopped
            raise

    async def abort(self, request_id: str) -> None:
        for p in [*self._queue, *self._running]:
            if p.request_id == request_id:
                self._abort(p)

    def abort_all(self, reason: str) -> int:
        """Stop every queued and running request (this process was presumed dead: their holds are gone)."""
        pending = [*self._queue, *self._running]
        for p in pending:
            self._abort(p, Aborted(reason))
        return len(pending)

    async def check_health(self) -> None:
        if not self._ready:
            raise RuntimeError("model not loaded yet")
        if not self._workers or any(w.done() for w in self._workers):
            raise RuntimeError("a batching worker has stopped")

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        for p in self._queue:
            self._settle(p, error=Overloaded("the server is shutting down", retry_after_s=5))
        self._queue.clear()
        for executor in self._executors:
            executor.shutdown(wait=True, cancel_futures=True)

    # --- the worker ---------------------------------------------------------------------------------------

    def _settle(
        self, p: _Pending, *, result: GenerationResult | None = None, error: BaseException | None = None
    ) -> None:
        if p.deadline is not None:
            p.deadline.cancel()
        if p.future.done():
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            assert result is not None
            p.future.set_result(result)

    def _abort(self, p: _Pending, error: BaseException | None = None) -> None:
        """Stop one request: out of the queue now, or out of its batch at the next model call."""
        if not p.aborted:
            p.aborted = True
            self._aborted += 1
        with contextlib.suppress(ValueError):
            self._queue.remove(p)
        self._settle(p, error=error or Aborted(p.request_id))

    def _retry_after(self) -> int:
        waiting_batches = (len(self._queue) / max(1, self.max_batch_images) + 1) / self.workers
        return max(1, round(waiting_batches * self._batch_avg_s))

    def _expire(self, p: _Pending) -> None:
        """A request still queued at its deadline fails then (a timer, so a long batch cannot delay it)."""
        if p in self._queue:
            self._queue.remove(p)
            deadline = self.settings.queue_timeout_s
            self._settle(p, error=QueueTimeout(f"the request waited over {deadline:g} s in the queue"))

    def _take_batch(self) -> list[tuple[_Pending, GenerationJob]]:
        """The oldest request and every queued one that can share its forward pass, up to max_batch_images."""
        first = self._queue.pop(0)
        room = max(1, self.max_batch_images)
        batch = [(first, first.chunk(room))]
        room -= batch[0][1].batch_size
        key = batch_key(first.job)
        for p in list(self._queue):
            if room <= 0:
                break
            if batch_key(p.job) == key:
                self._queue.remove(p)
                batch.append((p, p.chunk(room)))
                room -= batch[-1][1].batch_size
        return batch

    async def _run_worker(self, pipeline: SD3Pipeline | None, executor: ThreadPoolExecutor) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                # Give a lone request a moment for company that could share its forward pass.
                wait_s = self.settings.batch_wait_ms / 1000 - (time.monotonic() - self._queue[0].enqueued)
                if wait_s > 0 and len(self._queue) < self.max_batch_images:
                    await asyncio.sleep(wait_s)
                    continue
                batch = self._take_batch()
                try:
                    await self._run_batch(batch, pipeline, executor)
                except asyncio.CancelledError:
                    raise
                except BaseException as e:  # a bug in the bookkeeping: fail this batch, keep serving
                    log.exception("batch of %d requests failed outside the model", len(batch))
                    for p, _ in batch:
                        self._settle(p, error=e)

    async def _run_batch(
        self, batch: list[tuple[_Pending, GenerationJob]], pipeline: SD3Pipeline | None, executor: ThreadPoolExecutor
    ) -> None:
        mine = [p for p, _ in batch]
        self._running.extend(mine)
        for p in mine:
            if p.deadline is not None:
                p.deadline.cancel()

        def request_step(p: _Pending, chunk: GenerationJob, done: int, total: int) -> int:
            # Over the whole request: the images made so far count as finished.
            return (len(p.done.images) * total + done * chunk.batch_size) // p.job.batch_size

        def progress(done: int, total: int) -> None:  # on the model's thread
            for p, chunk in batch:
                if p.progress is not None and not p.aborted:
                    try:
                        p.progress(request_step(p, chunk, done, total), total)
                    except Exception:  # a listener's bug must not fail the batch
                        log.warning("progress listener of %s failed", p.request_id, exc_info=True)

        def live() -> list[bool]:  # on the model's thread: plain reads of flags the event loop sets
            return [not p.aborted for p, _ in batch]

        jobs = [chunk for _, chunk in batch]
        previews = _previews(batch, request_step)
        run = pipeline or self.pipeline
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                executor, lambda: run.generate_many(jobs, progress=progress, live=live, previews=previews)
            )
            if len(results) != len(batch):
                raise RuntimeError(f"the pipeline returned {len(results)} results for {len(batch)} requests")
        except AllAborted:
            for p, _ in batch:
                self._settle(p, error=Aborted(p.request_id))
        except Exception as e:
            self._failed_batches += 1
            log.exception("batch of %d requests failed", len(batch))
            for p, _ in batch:
                self._settle(p, error=e)
        else:
            for (p, _), r in zip(batch, results, strict=True):
                if p.aborted:
                    self._settle(p, error=Aborted(p.request_id))
                    continue
                p.add(r)
                if p.remaining > 0:
                    self._queue.append(p)  # the rest after the requests that waited meanwhile
                    self._wakeup.set()
                else:
                    self._settle(p, result=p.done)
        finally:
            self._running = [p for p in self._running if p not in mine]
        elapsed = time.perf_counter() - start
        self._batches += 1
        self._batch_avg_s = 0.8 * self._batch_avg_s + 0.2 * elapsed
        if self._on_batch is not None:
            try:
                self._on_batch(sum(chunk.batch_size for chunk in jobs), elapsed)
            except Exception:
                log.warning("batch observer failed", exc_info=True)


def _previews(
    batch: list[tuple[_Pending, GenerationJob]], request_step: Callable[[_Pending, GenerationJob, int, int], int]
) -> PreviewHook | None:
    """The batch's preview hook: each request that listens for previews gets its first row's (None: none listens)."""
    listeners: dict[int, tuple[_Pending, GenerationJob, PreviewListener]] = {}
    row = 0
    for p, chunk in batch:
        if isinstance(p.progress, PreviewListener):
            listeners[row] = (p, chunk, p.progress)
        row += chunk.batch_size
    if not listeners:
        return None

    def rows() -> list[int]:  # on the model's thread, at every model call
        return [r for r, (p, _, listener) in listeners.items() if not p.aborted and listener.wants_preview()]

    def put(r: int, done: int, total: int, rgb: np.ndarray) -> None:
        p, chunk, listener = listeners[r]
        try:
            listener.preview(request_step(p, chunk, done, total), total, rgb)
        except Exception:  # a listener's bug must not fail the batch
            log.warning("preview listener of %s failed", p.request_id, exc_info=True)

    return PreviewHook(rows=rows, put=put)
