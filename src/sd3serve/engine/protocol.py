"""The engine interface: all the HTTP layer knows of inference (after vLLM's ``EngineClient``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sd3serve.engine.job import GenerationJob, GenerationResult

ProgressCallback = Callable[[int, int], None]  # (steps done, steps in all)


class Aborted(Exception):
    """The request was aborted (its client went away) before it finished."""


class Engine(Protocol):
    @property
    def is_ready(self) -> bool:
        """True once the model is loaded and warmed up."""
        ...

    async def start(self) -> None:
        """Load the model and warm it up."""
        ...

    async def generate(
        self, job: GenerationJob, *, request_id: str, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Run the job; raises Aborted if ``abort(request_id)`` was called first."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
        ...

    async def close(self) -> None: ...
