"""An engine that returns flat images instantly: for tests of the HTTP layer alone (fuzzing, load)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.engine.protocol import EngineStats


class StubEngine:
    is_ready = True
    queue_depth = 0

    async def start(self) -> None: ...

    async def generate(self, job: GenerationJob, *, request_id: str, progress: Any = None) -> GenerationResult:
        if progress is not None:
            progress(job.steps, job.steps)
        shade = job.seed % 256
        return GenerationResult(
            images=[
                Image.new("RGB", (job.width, job.height), (shade, (shade + i) % 256, 0)) for i in range(job.batch_size)
            ]
        )

    async def abort(self, request_id: str) -> None: ...

    def abort_all(self, reason: str) -> int:
        return 0

    def admit(self) -> None: ...

    def position(self, request_id: str) -> int | None:
        return None

    def stats(self) -> EngineStats:
        return EngineStats(ready=True, queued=0, running=0, batches=0, failed_batches=0, aborted=0,
                           prompt_cache_hits=0, prompt_cache_misses=0, prompt_cache_entries=0,
                           prompt_cache_bytes=0)  # fmt: skip

    async def check_health(self) -> None: ...

    async def close(self) -> None: ...


class FailingEngine(StubEngine):
    """An engine that fails on purpose, to prove a failed generation costs nothing."""

    async def generate(self, job: GenerationJob, *, request_id: str, progress: Any = None) -> GenerationResult:
        raise RuntimeError("secret internal detail: CUDA out of memory at /opt/model.py:42")
