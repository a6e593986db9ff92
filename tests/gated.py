"""An engine whose batches wait for a gate, so that tests can pile requests up in the queue on demand."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from live_server import LiveServer, run_live_server
from sd3serve.engine.batching import BatchingEngine
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.settings import Settings


class GatedEngine(BatchingEngine):
    """The real engine whose batches wait for a gate: requests pile up in the queue on demand."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.gate.set()
        self.pause_at_step: int | None = None  # None: wait before the batch; k: wait after step k
        self.paused = threading.Event()

    def _run_gated(
        self, jobs: list[GenerationJob], progress: object, live: object = None, previews: object = None
    ) -> list:
        if self.pause_at_step is None:
            self.paused.set()
            self.gate.wait(timeout=60)
            return super().pipeline.generate_many(jobs, progress=progress, live=live, previews=previews)  # type: ignore[arg-type]

        def pausing(done: int, total: int) -> None:
            progress(done, total)  # type: ignore[operator]
            if done == self.pause_at_step:
                self.paused.set()
                self.gate.wait(timeout=60)

        return super().pipeline.generate_many(jobs, progress=pausing, live=live, previews=previews)  # type: ignore[arg-type]

    @property
    def workers(self) -> int:
        return 1  # one model worker: batches wait for the gate in turn

    async def close(self) -> None:
        self.gate.set()  # a batch held at the gate must end for the engine to close
        await super().close()

    @property
    def pipeline(self) -> SD3Pipeline:
        real = super().pipeline
        gated = dataclasses.make_dataclass("Gated", [])()
        gated.generate_many = lambda jobs, progress=None, live=None, previews=None: self._run_gated(  # type: ignore[attr-defined]
            jobs, progress, live, previews
        )
        gated.prompt_cache = real.prompt_cache  # type: ignore[attr-defined]
        return gated  # type: ignore[return-value]


class CountingGate(GatedEngine):
    """A gated engine that records every step the model reports."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps_seen: list[int] = []

    def _run_gated(
        self, jobs: list[GenerationJob], progress: object, live: object = None, previews: object = None
    ) -> list:
        def counting(done: int, total: int) -> None:
            self.steps_seen.append(done)
            if progress is not None:
                progress(done, total)  # type: ignore[operator]

        return super()._run_gated(jobs, counting, live, previews)


@contextlib.contextmanager
def paused_server(model: Any, data_dir: Path, *, pause_at_step: int) -> Iterator[tuple[LiveServer, CountingGate]]:
    """A live server whose engine pauses after step ``pause_at_step`` of each batch until ``engine.gate`` is set."""
    settings = Settings(data_dir=data_dir, device="cpu", batch_wait_ms=0)
    engine = CountingGate(settings, model)
    gen = run_live_server(settings, engine=engine)
    server = next(gen)
    engine.pause_at_step, engine.gate = pause_at_step, threading.Event()
    try:
        yield server, engine
    finally:
        engine.gate.set()
        gen.close()
