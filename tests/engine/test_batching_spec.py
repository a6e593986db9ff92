"""The batching engine's promises (the docstring of engine/batching.py, docs/serving.md), checked against a pipeline
that records what it is asked and draws no pixels: requests that can share a forward pass share it up to the image
limit, a request larger than a batch runs a batch's worth at a time behind those that waited meanwhile with image i
on seed + i, a failed batch fails each of its requests and the engine goes on, a cancelled request stops, a queued
one fails at its deadline, the queue is bounded (503 with a Retry-After), and progress counts over a whole request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from helpers.engines import started
from helpers.jobs import make_job
from sd3serve.engine import batching
from sd3serve.engine.batching import BatchingEngine
from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.engine.pipeline import AllAborted
from sd3serve.engine.previews import PreviewHook
from sd3serve.engine.protocol import Aborted
from sd3serve.errors import Overloaded, QueueTimeout
from sd3serve.settings import Settings
from sd3serve.threads import PhaseThreads


def seed_of(image: Image.Image) -> int:
    return int(image.info["seed"])


class FakePipeline:
    """Each image carries its seed; ``gate`` (when set) holds a batch until it opens; ``fail`` makes the next batch
    raise it; ``steps`` progress calls are made per batch; ``truncated`` marks the prompts the encoder cut."""

    def __init__(self) -> None:
        self.batches: list[list[GenerationJob]] = []
        self.model = SimpleNamespace(source="fake", device=SimpleNamespace(type="cpu"))
        self.threads = None
        self.prompt_cache = None
        self.gate: threading.Event | None = None
        self.running = threading.Event()
        self.fail: BaseException | None = None
        self.result_count: int | None = None
        self.truncated: set[str] = set()
        self.lives: list[list[bool]] = []
        self.preview_rows: list[list[int]] = []

    def __call__(self, job: GenerationJob) -> GenerationResult:  # the warm-up
        return GenerationResult(images=[])

    def generate_many(self, jobs: list[GenerationJob], *, progress: Any = None, live: Any = None,
                      previews: PreviewHook | None = None) -> list[GenerationResult]:  # fmt: skip
        self.batches.append(list(jobs))
        self.running.set()
        if self.gate is not None:
            assert self.gate.wait(60)
        if self.fail is not None:
            fail, self.fail = self.fail, None
            raise fail
        steps = jobs[0].steps
        for done in range(steps + 1):
            if progress is not None:
                progress(done, steps)
            if live is not None:
                self.lives.append(live())
            if previews is not None:
                rows = list(previews.rows())
                self.preview_rows.append(rows)
                for row in rows:
                    previews.put(row, done, steps, np.zeros((2, 2, 3), np.uint8))
        results = []
        for job in jobs:
            images = []
            for i in range(job.batch_size):
                image = Image.new("L", (1, 1))
                image.info["seed"] = job.seed + i
                images.append(image)
            results.append(GenerationResult(images=images, timings={"denoise": 1.0},
                                            prompt_truncated=job.prompt in self.truncated))  # fmt: skip
        return results[: self.result_count] if self.result_count is not None else results


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakePipeline:
    pipeline = FakePipeline()
    monkeypatch.setattr(batching, "build_pipeline", lambda settings, model: pipeline)
    return pipeline


def settings(**fields: Any) -> Settings:
    return Settings(device="cpu", **({"batch_wait_ms": 0, "max_batch_images": 2} | fields))


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def hold_first_batch(engine: BatchingEngine, fake: FakePipeline, job: GenerationJob) -> asyncio.Task[Any]:
    """A request running on the model, held at its gate; the caller opens ``fake.gate``."""
    fake.gate = threading.Event()
    task = asyncio.create_task(engine.generate(job, request_id="holder"))
    await until(fake.running.is_set)
    return task


@pytest.mark.anyio
async def test_requests_that_can_share_a_pass_share_it_up_to_the_image_limit(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings(max_batch_images=3))) as engine:
        holder = await hold_first_batch(engine, fake, make_job(width=128))
        a = asyncio.create_task(engine.generate(make_job(seed=10), request_id="a"))
        other = asyncio.create_task(engine.generate(make_job(seed=20, steps=2), request_id="other"))
        b = asyncio.create_task(engine.generate(make_job(seed=30, batch_size=2), request_id="b"))
        c = asyncio.create_task(engine.generate(make_job(seed=40), request_id="c"))
        await until(lambda: engine.queue_depth == 4)
        assert engine.position("a") == 0 and engine.position("c") == 3 and engine.position("holder") is None
        assert engine.in_flight == 1
        assert fake.gate is not None
        fake.gate.set()
        results = await asyncio.gather(holder, a, other, b, c)
    assert [seed_of(i) for i in results[1].images] == [10]
    assert [seed_of(i) for i in results[3].images] == [30, 31]
    # The oldest (a) and the compatible b fill the 3 images; c waits for the next batch; "other" differs in steps.
    sizes = [[(j.seed, j.batch_size) for j in batch] for batch in fake.batches]
    assert sizes == [[(5, 1)], [(10, 1), (30, 2)], [(20, 1)], [(40, 1)]]
    assert engine.stats().batches == 4 and engine.stats().failed_batches == 0


@pytest.mark.anyio
async def test_a_request_larger_than_a_batch_runs_in_chunks_behind_those_that_waited(fake: FakePipeline) -> None:
    fake.truncated = {"long"}
    async with started(BatchingEngine(settings(max_batch_images=2))) as engine:
        holder = await hold_first_batch(engine, fake, make_job(width=128))
        big = asyncio.create_task(engine.generate(make_job(prompt="long", seed=100, batch_size=5), request_id="big"))
        await until(lambda: engine.queue_depth == 1)
        small = asyncio.create_task(engine.generate(make_job(seed=7, width=96), request_id="small"))
        await until(lambda: engine.queue_depth == 2)
        assert fake.gate is not None
        fake.gate.set()
        result, small_result = await big, await small
        await holder
    assert [seed_of(i) for i in result.images] == [100, 101, 102, 103, 104]  # image i on seed + i
    assert result.prompt_truncated and not small_result.prompt_truncated
    assert result.timings == {"denoise": 3.0}  # three batches' timings added up
    chunks = [[(j.seed, j.batch_size) for j in batch] for batch in fake.batches]
    # 2 images, then the small request that waited meanwhile, then 2, then the last one.
    assert chunks == [[(5, 1)], [(100, 2)], [(7, 1)], [(102, 2)], [(104, 1)]]


@pytest.mark.anyio
async def test_a_failed_batch_fails_each_of_its_requests_and_the_engine_goes_on(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings())) as engine:
        fake.fail = RuntimeError("out of memory")
        first = asyncio.create_task(engine.generate(make_job(seed=1), request_id="1"))
        second = asyncio.create_task(engine.generate(make_job(seed=2), request_id="2"))
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(o, RuntimeError) and str(o) == "out of memory" for o in outcomes)
        assert engine.stats().failed_batches == 1
        later = await engine.generate(make_job(seed=3), request_id="3")
        assert [seed_of(i) for i in later.images] == [3]
        await engine.check_health()


@pytest.mark.anyio
async def test_a_pipeline_that_loses_a_result_fails_the_batch(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings())) as engine:
        fake.gate = threading.Event()
        fake.result_count = 1
        first = asyncio.create_task(engine.generate(make_job(seed=1), request_id="1"))
        second = asyncio.create_task(engine.generate(make_job(seed=2), request_id="2"))
        await until(lambda: engine.queue_depth + engine.in_flight == 2 and fake.running.is_set())
        fake.gate.set()
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert engine.stats().failed_batches >= 1


@pytest.mark.anyio
async def test_a_batch_whose_requests_all_left_fails_them_as_aborted(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings())) as engine:
        fake.fail = AllAborted()
        with pytest.raises(Aborted):
            await engine.generate(make_job(), request_id="gone")
        assert engine.stats().failed_batches == 0


@pytest.mark.anyio
async def test_cancelling_a_queued_request_drops_it_and_a_running_one_stops(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings(max_batch_images=1))) as engine:
        holder = await hold_first_batch(engine, fake, make_job(seed=1))
        queued = asyncio.create_task(engine.generate(make_job(seed=2), request_id="queued"))
        await until(lambda: engine.queue_depth == 1)
        await engine.abort("queued")
        with pytest.raises(Aborted):
            await queued
        assert engine.queue_depth == 0
        await engine.abort("holder")
        assert fake.gate is not None
        fake.gate.set()
        with pytest.raises(Aborted):
            await holder
        await until(lambda: engine.in_flight == 0)
        assert fake.lives and all(lives == [False] for lives in fake.lives)  # the pipeline was told: not wanted
        assert engine.stats().aborted == 2


@pytest.mark.anyio
async def test_a_caller_that_goes_away_takes_its_queued_request_with_it(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings(max_batch_images=1))) as engine:
        holder = await hold_first_batch(engine, fake, make_job(seed=1))
        queued = asyncio.create_task(engine.generate(make_job(seed=2), request_id="queued"))
        await until(lambda: engine.queue_depth == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert engine.queue_depth == 0 and engine.stats().aborted == 1
        assert fake.gate is not None
        fake.gate.set()
        await holder
    assert len(fake.batches) == 1


@pytest.mark.anyio
async def test_abort_all_stops_every_request_with_the_reason(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings(max_batch_images=1))) as engine:
        holder = await hold_first_batch(engine, fake, make_job(seed=1))
        queued = asyncio.create_task(engine.generate(make_job(seed=2), request_id="queued"))
        await until(lambda: engine.queue_depth == 1)
        assert engine.abort_all("presumed dead") == 2
        for task in (holder, queued):
            with pytest.raises(Aborted, match="presumed dead"):
                await task
        assert fake.gate is not None
        fake.gate.set()


@pytest.mark.anyio
async def test_a_queued_request_fails_at_its_deadline_even_while_a_batch_runs(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings(max_batch_images=1, queue_timeout_s=0.2))) as engine:
        holder = await hold_first_batch(engine, fake, make_job(seed=1))
        with pytest.raises(QueueTimeout):
            await engine.generate(make_job(seed=2), request_id="late")
        assert engine.queue_depth == 0
        assert fake.gate is not None
        fake.gate.set()
        assert [seed_of(i) for i in (await holder).images] == [1]  # it had started: no deadline


@pytest.mark.anyio
async def test_the_queue_is_bounded_and_refusals_say_when_to_retry(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings(max_batch_images=1, max_queue=2))) as engine:
        holder = await hold_first_batch(engine, fake, make_job(seed=1))
        waiting = [asyncio.create_task(engine.generate(make_job(seed=s), request_id=str(s))) for s in (2, 3)]
        await until(lambda: engine.queue_depth == 2)
        with pytest.raises(Overloaded) as full:
            await engine.generate(make_job(seed=4), request_id="4")
        assert full.value.retry_after_s >= 1
        assert engine.queue_depth == 2  # the refused request was never queued
        assert fake.gate is not None
        fake.gate.set()
        await asyncio.gather(holder, *waiting)
        await engine.generate(make_job(seed=5), request_id="5")  # room again


@pytest.mark.anyio
async def test_retry_after_grows_with_the_queue(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings(max_batch_images=1, max_queue=1))) as short_queue:
        holder = await hold_first_batch(short_queue, fake, make_job(seed=1))
        one = asyncio.create_task(short_queue.generate(make_job(seed=2), request_id="2"))
        await until(lambda: short_queue.queue_depth == 1)
        with pytest.raises(Overloaded) as after_one:
            short_queue.admit()
        assert fake.gate is not None
        fake.gate.set()
        await asyncio.gather(holder, one)
    fake.running.clear()
    async with started(BatchingEngine(settings(max_batch_images=1, max_queue=4))) as long_queue:
        holder = await hold_first_batch(long_queue, fake, make_job(seed=1))
        four = [asyncio.create_task(long_queue.generate(make_job(seed=s), request_id=str(s))) for s in range(2, 6)]
        await until(lambda: long_queue.queue_depth == 4)
        with pytest.raises(Overloaded) as after_four:
            long_queue.admit()
        assert fake.gate is not None
        fake.gate.set()
        await asyncio.gather(holder, *four)
    assert after_four.value.retry_after_s > after_one.value.retry_after_s >= 1


@pytest.mark.parametrize(("workers", "expected"), [(1, 50), (2, 25)])
@pytest.mark.anyio
async def test_retry_after_is_the_queue_ahead_plus_one_batch_shared_by_the_workers(
    fake: FakePipeline, workers: int, expected: int
) -> None:
    """Retry-After: the batches queued plus the one a retry would join, at the average batch time, run by the
    model workers side by side: (4 queued + 1) x 10 s / workers."""
    fake.threads = PhaseThreads(denoise=1, decode=1, workers=workers, cores=2)
    fake.worker = lambda: fake  # type: ignore[attr-defined]  # every worker records into the same fake
    async with started(BatchingEngine(settings(max_batch_images=1, max_queue=4))) as engine:
        assert engine.workers == workers
        fake.gate = threading.Event()
        running = [asyncio.create_task(engine.generate(make_job(seed=s), request_id=f"run{s}"))
                   for s in range(workers)]  # fmt: skip
        await until(lambda: engine.in_flight == workers)
        queued = [asyncio.create_task(engine.generate(make_job(seed=s), request_id=str(s))) for s in range(10, 14)]
        await until(lambda: engine.queue_depth == 4)
        engine._batch_avg_s = 10.0  # the running average of batch times, as after 10-second batches
        with pytest.raises(Overloaded) as full:
            engine.admit()
        fake.gate.set()
        await asyncio.gather(*running, *queued)
    assert full.value.retry_after_s == expected


@pytest.mark.anyio
async def test_nothing_is_admitted_before_the_model_is_ready(fake: FakePipeline) -> None:
    engine = BatchingEngine(settings())
    assert not engine.is_ready and not engine.stats().ready
    with pytest.raises(Overloaded) as loading:
        await engine.generate(make_job(), request_id="early")
    assert loading.value.retry_after_s == 5
    with pytest.raises(RuntimeError):
        await engine.check_health()
    with pytest.raises(RuntimeError):
        engine.pipeline  # noqa: B018
    async with started(engine):
        assert engine.is_ready and engine.stats().ready and engine.pipeline is fake  # type: ignore[comparison-overlap]
        await engine.check_health()


@pytest.mark.anyio
async def test_close_with_a_request_still_queued_answers_503(fake: FakePipeline) -> None:
    engine = BatchingEngine(settings(max_batch_images=1))
    await engine.start()
    for worker in engine._workers:  # the worker is gone: the request stays queued
        worker.cancel()
    queued = asyncio.create_task(engine.generate(make_job(seed=2), request_id="queued"))
    await until(lambda: engine.queue_depth == 1)
    with pytest.raises(RuntimeError):
        await engine.check_health()  # a stopped worker is unhealthy
    await engine.close()
    with pytest.raises(Overloaded) as e:
        await queued
    assert e.value.retry_after_s == 5


def test_the_image_limit_per_batch() -> None:
    assert BatchingEngine(settings(max_batch_images=3)).max_batch_images == 3
    assert BatchingEngine(Settings(device="cpu")).max_batch_images == 1  # no model yet, or a CPU model: one image
    cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    assert BatchingEngine(Settings(device="cpu"), model=cuda).max_batch_images == 4  # type: ignore[arg-type]
    assert BatchingEngine(Settings(device="cpu"), model=cpu).max_batch_images == 1  # type: ignore[arg-type]
    assert BatchingEngine(Settings(device="cpu", max_batch_images=2), model=cuda).max_batch_images == 2  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_lone_request_waits_batch_wait_ms_for_company(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings(max_batch_images=2, batch_wait_ms=300))) as engine:
        first = asyncio.create_task(engine.generate(make_job(seed=1), request_id="1"))
        await asyncio.sleep(0)
        second = asyncio.create_task(engine.generate(make_job(seed=2), request_id="2"))
        await asyncio.gather(first, second)
    assert [[j.seed for j in batch] for batch in fake.batches] == [[1, 2]]


@pytest.mark.anyio
async def test_progress_counts_over_the_whole_request_and_a_failing_listener_is_harmless(fake: FakePipeline) -> None:
    seen: list[tuple[int, int]] = []

    def broken(step: int, steps: int) -> None:
        raise ValueError("listener bug")

    async with started(BatchingEngine(settings(max_batch_images=3, batch_wait_ms=300))) as engine:
        big = asyncio.create_task(engine.generate(make_job(steps=2, batch_size=4), request_id="big",
                                                  progress=lambda s, t: seen.append((s, t))))  # fmt: skip
        await asyncio.sleep(0)
        other = asyncio.create_task(engine.generate(make_job(steps=2, seed=50), request_id="o", progress=broken))
        result, _ = await asyncio.gather(big, other)
    assert [seed_of(i) for i in result.images] == [5, 6, 7, 8]
    # 3 of the 4 images; the rest goes behind the request that waited meanwhile, and shares its batch.
    assert [[(j.seed, j.batch_size) for j in batch] for batch in fake.batches] == [[(5, 3)], [(50, 1), (8, 1)]]
    # After step d of 2 of a chunk of c images, with m made before it, the request is at step (2m + dc) // 4 of 2:
    # (0, 0, 1) in the first chunk (m 0, c 3), (1, 1, 2) in the second (m 3, c 1). Never backwards, 2 only at the end.
    assert seen == [(0, 2), (0, 2), (1, 2), (1, 2), (1, 2), (2, 2)]


@pytest.mark.anyio
async def test_the_batch_observer_sees_images_and_seconds_and_may_fail(fake: FakePipeline) -> None:
    observed: list[tuple[int, float]] = []
    async with started(BatchingEngine(settings(max_batch_images=3, batch_wait_ms=300),
                                      on_batch=lambda n, s: observed.append((n, s)))) as engine:  # fmt: skip
        await asyncio.gather(engine.generate(make_job(batch_size=2), request_id="a"),
                             engine.generate(make_job(seed=9), request_id="b"))  # fmt: skip
    assert [n for n, _ in observed] == [3] and observed[0][1] >= 0

    def broken(n: int, s: float) -> None:
        raise ValueError("observer bug")

    async with started(BatchingEngine(settings(), on_batch=broken)) as engine:
        assert len((await engine.generate(make_job(), request_id="c")).images) == 1


class Listener:
    def __init__(self, wants: bool) -> None:
        self.wants = wants
        self.previews: list[tuple[int, int]] = []

    def __call__(self, step: int, steps: int) -> None:
        pass

    def wants_preview(self) -> bool:
        return self.wants

    def preview(self, step: int, steps: int, rgb: np.ndarray) -> None:
        self.previews.append((step, steps))


@pytest.mark.anyio
async def test_previews_go_to_the_first_image_of_each_request_that_asks(fake: FakePipeline) -> None:
    plain = Listener(wants=False)
    asking = Listener(wants=True)
    async with started(BatchingEngine(settings(max_batch_images=5, batch_wait_ms=300))) as engine:
        await asyncio.gather(
            engine.generate(make_job(steps=2, batch_size=2, seed=1), request_id="plain", progress=plain),
            engine.generate(make_job(steps=2, batch_size=2, seed=3), request_id="asking", progress=asking),
            engine.generate(make_job(steps=2, seed=5), request_id="none", progress=lambda s, t: None),
        )
    assert [[j.seed for j in batch] for batch in fake.batches] == [[1, 3, 5]]
    assert fake.preview_rows == [[2], [2], [2]]  # rows 0-1 are "plain"'s images, row 2 the first of "asking"'s
    assert asking.previews == [(0, 2), (1, 2), (2, 2)] and plain.previews == []


@pytest.mark.anyio
async def test_no_preview_hook_when_no_request_listens(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings())) as engine:
        await engine.generate(make_job(), request_id="quiet")
    assert fake.preview_rows == []


@pytest.mark.anyio
async def test_stats_count_batches_failures_and_aborts(fake: FakePipeline) -> None:
    async with started(BatchingEngine(settings())) as engine:
        await engine.generate(make_job(), request_id="ok")
        fake.fail = RuntimeError("x")
        with pytest.raises(RuntimeError):
            await engine.generate(make_job(), request_id="bad")
        stats = engine.stats()
    assert (stats.batches, stats.failed_batches, stats.aborted, stats.queued, stats.running) == (2, 1, 0, 0, 0)
    assert stats.prompt_cache_hits == 0 and stats.prompt_cache_entries == 0


@pytest.mark.anyio
async def test_a_bookkeeping_failure_outside_the_model_fails_its_batch_with_that_error_and_serving_goes_on(
    fake: FakePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with started(BatchingEngine(settings())) as engine:
        run_batch = engine._run_batch
        calls = 0

        async def broken_once(*args: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in the bookkeeping")
            await run_batch(*args)

        monkeypatch.setattr(engine, "_run_batch", broken_once)
        with pytest.raises(RuntimeError, match="a bug in the bookkeeping"):
            await engine.generate(make_job(seed=1), request_id="first")
        result = await asyncio.wait_for(engine.generate(make_job(seed=2), request_id="second"), 60)
    assert [seed_of(i) for i in result.images] == [2]
