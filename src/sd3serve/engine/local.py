"""An engine in this process: the model runs on one worker thread, off the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.engine.loading import LoadedModel, load_model
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.engine.protocol import Aborted, ProgressCallback
from sd3serve.settings import Settings

log = logging.getLogger(__name__)


class LocalEngine:
    def __init__(self, settings: Settings, model: LoadedModel | None = None) -> None:
        self.settings = settings
        self._model = model
        self._pipeline: SD3Pipeline | None = None
        # One thread: the model is not re-entrant, and a second thread would only contend for the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd3-engine")
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._ready = False

    @property
    def is_ready(self) -> bool:
        return self._ready

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            raise RuntimeError("engine not started")
        return self._model

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_and_warm)
        self._ready = True

    def _load_and_warm(self) -> None:
        if self._model is None:
            self._model = load_model(self.settings)
        self._pipeline = SD3Pipeline(self._model, exact_batches=self.settings.exact_batches)
        warm = GenerationJob(
            prompt="warm-up",
            negative_prompt="",
            steps=1,
            guidance_scale=1.0,
            seed=0,
            sampler="euler",
            scheduler="simple",
            width=256,
            height=256,
            batch_size=1,
        )
        self._pipeline(warm)
        log.info("engine ready")

    async def generate(
        self, job: GenerationJob, *, request_id: str, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, job, request_id, progress)

    def _run(self, job: GenerationJob, request_id: str, progress: ProgressCallback | None) -> GenerationResult:
        if self._pipeline is None:
            raise RuntimeError("engine not started")

        def on_step(done: int, total: int) -> None:
            if self._take_abort(request_id):
                raise Aborted(request_id)
            if progress is not None:
                progress(done, total)

        try:
            return self._pipeline(job, progress=on_step)
        finally:
            self._take_abort(request_id)

    def _take_abort(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._aborted:
                self._aborted.discard(request_id)
                return True
            return False

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    async def check_health(self) -> None:
        if not self._ready:
            raise RuntimeError("model not loaded yet")

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
