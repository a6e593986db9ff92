"""The engine interface: all the HTTP layer knows of inference (after vLLM's ``EngineClient``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from sd3serve.engine.job import GenerationJob, GenerationResult

# (steps done, steps in all). Called on the engine's thread between model calls: it must return at once (no I/O,
# no locks held for long); the API side reads the latest value from a ``ProgressChannel``.
ProgressCallback = Callable[[int, int], None]


@runtime_checkable
class PreviewListener(Protocol):
    """A progress callback that also takes live previews (the API's ``ProgressChannel``). On the engine's thread,
    like the callback: ``wants_preview()`` is asked at every model call (a plain read), ``preview(step, steps, rgb)``
    gets the request's first image in the running batch as its x0 estimate after that step, (h, w, 3) uint8 at the
    latent grid."""

    def __call__(self, step: int, steps: int) -> None: ...

    def wants_preview(self) -> bool: ...

    def preview(self, step: int, steps: int, rgb: np.ndarray) -> None: ...


class Aborted(Exception):
    """The request was aborted (its client went away, or it was cancelled) before it finished."""


@dataclass(frozen=True)
class EngineStats:
    """What /metrics and /readyz show of the engine."""

    ready: bool
    queued: int  # requests waiting for the model
    running: int  # requests in the batch on the model now
    batches: int  # batches run since start
    failed_batches: int  # batches that raised (their requests failed, uncharged)
    aborted: int  # requests stopped early because every requester was gone
    prompt_cache_hits: int
    prompt_cache_misses: int
    prompt_cache_entries: int
    prompt_cache_bytes: int


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
        """Run the job. Raises Aborted after ``abort(request_id)``, Overloaded when the queue is full,
        QueueTimeout when it waited past the deadline. Cancelling the awaiting task aborts the job too."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop the request: a queued one leaves the queue, a running one stops at the next step (the other
        requests of its batch go on)."""
        ...

    def abort_all(self, reason: str) -> int:
        """Stop every queued and running request (raising Aborted(reason) in their callers); returns how many."""
        ...

    def admit(self) -> None:
        """Raise Overloaded (with its Retry-After) if a request submitted now would be refused."""
        ...

    def stats(self) -> EngineStats: ...

    def position(self, request_id: str) -> int | None:
        """How many requests are ahead of this one in the queue (0: next), or None if it is not queued here."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
        ...

    async def close(self) -> None: ...
