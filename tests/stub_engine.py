"""An engine that returns flat images instantly: for tests of the HTTP layer alone (fuzzing, load)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from sd3serve.engine.job import GenerationJob, GenerationResult


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

    async def check_health(self) -> None: ...

    async def close(self) -> None: ...
