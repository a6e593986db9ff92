"""The one generation path: every route (v1, v2, image-to-image, OpenAI) decodes its wire format into an
:class:`~sd3serve.service.order.Order` and calls this service.

For each order: check that the model engine would admit it, reserve its cost in the ledger (406 if short), run it
on the model engine, encode its images, and settle the reservation: captured with the delivery, or returned on any
failure, abort, disconnect or shutdown. The model engine reports progress to a channel; only this side writes to
the ledger, through its async façade (``Ledger.run`` / ``Ledger.call``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from sd3serve.blocking import run_blocking
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.lora_names import check_adapters, lora_dir
from sd3serve.engine.protocol import Aborted, Engine
from sd3serve.errors import GenerationFailed, InvalidRequest, ReservationLost, SD3ServeError, StorageFull
from sd3serve.imaging import encode_image
from sd3serve.ledger import CreditHold, HoldWork, KeyInfo, Ledger, Reservation, Tx
from sd3serve.ledger.idempotency import Claim
from sd3serve.ledger.tasks import TaskView
from sd3serve.service.metrics import Metrics
from sd3serve.service.order import Order, Webhook
from sd3serve.service.progress import PreviewBoard, ProgressChannel
from sd3serve.service.webhook_delivery import target_problem
from sd3serve.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
TaskRunner = Callable[[Reservation, Order, str], Awaitable[None]]

PROGRESS_WRITE_INTERVAL_S = 0.25  # v2 progress reaches the database at most this often per task
PERSIST_ATTEMPTS = 60  # about 5 minutes of retries while the database is away
STOPPED = "this request was stopped before it finished (the server was presumed dead); nothing was charged, retry"


class ClientGone(Exception):
    """The client closed the connection before its images were ready: nothing delivered, nothing charged."""


@dataclass(frozen=True)
class Delivery:
    """What a synchronous request gets: its encoded images and what they cost."""

    files: list[bytes]
    seed: int
    seconds: float
    cost: float
    remaining: float
    prompt_truncated: bool
    replayed: bool = False  # the stored first answer to this Idempotency-Key

    def answer(self) -> bytes:
        """The answer kept for idempotent retries (the balance is read again when it is replayed)."""
        files = [base64.b64encode(f).decode("ascii") for f in self.files]
        return json.dumps({"files": files, "seed": self.seed, "seconds": self.seconds, "cost": self.cost,
                           "prompt_truncated": self.prompt_truncated}).encode()  # fmt: skip

    @classmethod
    def replay(cls, answer: bytes, remaining: float) -> Delivery:
        d = json.loads(answer)
        files = [base64.b64decode(f) for f in d["files"]]
        return cls(files=files, seed=d["seed"], seconds=d["seconds"], cost=d["cost"], remaining=remaining,
                   prompt_truncated=d["prompt_truncated"], replayed=True)  # fmt: skip


@dataclass(frozen=True)
class Submission:
    """What an asynchronous submission gets: the task to poll."""

    task_id: str
    cost: float
    remaining: float
    replayed: bool = False

    def answer(self) -> bytes:
        return json.dumps({"task_id": self.task_id, "cost": self.cost}).encode()

    @classmethod
    def replay(cls, answer: bytes, remaining: float) -> Submission:
        d = json.loads(answer)
        return cls(task_id=d["task_id"], cost=d["cost"], remaining=remaining, replayed=True)


@dataclass(frozen=True)
class _Generated:
    files: list[bytes]
    seconds: float
    prompt_truncated: bool
    steps: int


class GenerationService:
    def __init__(self, *, model_engine: Engine, ledger: Ledger, settings: Settings, metrics: Metrics) -> None:
        self.model_engine = model_engine
        self.ledger = ledger
        self.settings = settings
        self.metrics = metrics
        self._background: dict[str, asyncio.Task[None]] = {}  # v2 tasks running in this process, by id
        self.previews = PreviewBoard()  # live previews of the v2 tasks run here, for the event streams that ask
        self.dispatch: TaskRunner | None = None  # runs accepted v2 tasks elsewhere (scale-out); None: here

    def price(self, job: GenerationJob) -> Decimal:
        """Per image; image-to-image runs ``steps`` steps as txt2img does (none at strength 0: free)."""
        return self.settings.price_per_image * job.batch_size * job.steps_run / job.steps

    # --- synchronous (v1) -----------------------------------------------------------------------------------

    async def generate(
        self, key: KeyInfo, order: Order, *, request_id: str, disconnected: Callable[[], Awaitable[None]],
        idempotency_key: str | None = None,
    ) -> Delivery:  # fmt: skip
        """Run the order while the client waits; ClientGone if ``disconnected()`` returns first (the engine
        then stops the job at its next step). With an ``idempotency_key``, a retry gets the first answer."""
        job = order.job
        claim, answer = await self._claim(key, idempotency_key, order)
        if answer is not None:
            return Delivery.replay(answer, await self._balance(key))
        try:
            if claim is not None:  # its answer will be stored for retries: it counts against the budget
                await self._check_storage(key, synchronous=True)
            self._admit(job)
            reservation = await self._reserve(key, job, request_id)
            try:
                out = await _first_or_gone(self._generate(order, request_id=request_id), disconnected())
                delivery = Delivery(files=out.files, seed=job.seed, seconds=out.seconds, cost=reservation.credits,
                                    remaining=0.0, prompt_truncated=out.prompt_truncated)  # fmt: skip
                record = _answering(claim, delivery.answer()) if claim else None
                remaining = await self.ledger.call(reservation.capture, deliver=record)
                claim = None  # answered: kept
            finally:
                if not reservation.settled:  # captured: nothing to refund, no trip to a thread
                    await self.ledger.call(reservation.close)
        finally:
            if claim is not None:
                await self._abandon(claim)
        self._count(job, reservation)
        return dataclasses.replace(delivery, remaining=remaining)

    # --- asynchronous (v2) ----------------------------------------------------------------------------------

    async def submit(
        self, key: KeyInfo, order: Order, *, request_id: str, idempotency_key: str | None = None, base_url: str = "",
    ) -> Submission:  # fmt: skip
        """Create the task with its hold (one transaction) and run it in the background. With an
        ``idempotency_key``, a retry gets the first submission's task; with the order's webhook, its outcome is
        POSTed there (URLs in it start with ``base_url``)."""
        job, webhook = order.job, order.webhook
        claim, answer = await self._claim(key, idempotency_key, order)
        if answer is not None:  # a retry gets its task whatever the server's state now
            return Submission.replay(answer, await self._balance(key))
        try:
            await self._check_storage(key)
            if webhook is not None:
                await self._check_webhook(key, webhook)
            self._admit(job)  # a full queue is a 503 at submission, not a task that fails later
            submission = Submission(task_id=request_id, cost=float(self.price(job)), remaining=0.0)
            answered = claim
            owner = self.ledger.instance_id

            def create(tx: Tx, hold: CreditHold) -> None:
                """The task, its webhook and its idempotent answer: in the hold's transaction, or none of them."""
                tx.tasks.create(task_id=request_id, key_id=key.id, hold=hold, seed=job.seed, owner=owner,
                                base64=order.output.base64, media_type=order.output.media_type,
                                request_json=order.request)  # fmt: skip
                if webhook is not None:
                    tx.webhooks.subscribe(task_id=request_id, key_id=key.id, url=webhook.url,
                                          events=list(webhook.events), base_url=base_url)  # fmt: skip
                if answered is not None:
                    tx.idempotency.answer(answered, submission.answer())

            reservation = await self._reserve(key, job, request_id, with_hold=create)
            claim = None  # the task exists, with its answer
        finally:
            if claim is not None:
                await self._abandon(claim)
        self._track(request_id, (self.dispatch or self._run_task)(reservation, order, request_id))
        remaining = await self._balance(key)
        return dataclasses.replace(submission, remaining=remaining)

    def run_here(self, reservation: Reservation, order: Order, task_id: str) -> asyncio.Task[None]:
        """Run an accepted v2 task in this process, tracked for cancel and drain (one another process dispatched)."""
        return self._track(task_id, self._run_task(reservation, order, task_id))

    def _track(self, task_id: str, work: Awaitable[None]) -> asyncio.Task[None]:
        runner = asyncio.ensure_future(work)
        runner.set_name(f"v2-{task_id}")
        self._background[task_id] = runner

        def untrack(_: object) -> None:
            if self._background.get(task_id) is runner:  # a task dispatched to this same process is tracked once
                del self._background[task_id]

        runner.add_done_callback(untrack)
        return runner

    async def _run_task(self, reservation: Reservation, order: Order, task_id: str) -> None:
        ttl = timedelta(seconds=self.settings.task_ttl_s)
        channel = ProgressChannel(asyncio.get_running_loop(), previews=self.previews, task_id=task_id)
        writer = asyncio.create_task(self._write_progress(task_id, channel), name=f"progress-{task_id}")

        async def fail(error: str) -> None:
            also = _failing(task_id, error=error, ttl=ttl)
            if not await self._persist(f"fail task {task_id}", reservation.fail, also=also):
                await self.ledger.call(reservation.close)  # the refund at least, retried by housekeeping

        try:
            out = await self._generate(order, request_id=task_id, progress=channel)
        except asyncio.CancelledError:
            await fail("the server shut down before the task finished; nothing was charged")
            raise
        except Aborted:
            await fail(STOPPED)
            return
        except SD3ServeError as e:
            await fail(str(e))
            return
        except Exception:
            log.exception("task %s failed", task_id)
            await fail("internal error; nothing was charged")
            return
        finally:
            writer.cancel()
            self.previews.forget(task_id)
        def deliver(tx: Tx, hold: CreditHold) -> None:
            tx.tasks.complete(task_id, hold=hold, images=out.files, inference_time=out.seconds, steps=out.steps,
                              ttl=ttl)  # fmt: skip

        try:
            await self._persist(f"complete task {task_id}", reservation.capture, deliver=deliver)
        except ReservationLost as e:
            log.warning("task %s: %s", task_id, e)
            return
        self._count(order.job, reservation)

    async def _write_progress(self, task_id: str, channel: ProgressChannel) -> None:
        """Persist the latest progress, at most every PROGRESS_WRITE_INTERVAL_S (best effort)."""
        while True:
            step, steps = await channel.changed()
            try:
                await self.ledger.run(_progress(task_id, step, steps))
            except Exception as e:
                log.warning("task %s: could not record progress: %s", task_id, e)
            await asyncio.sleep(PROGRESS_WRITE_INTERVAL_S)

    async def cancel(self, key: KeyInfo, task_id: str) -> tuple[TaskView, bool]:
        """Cancel the caller's task: CANCELLED and refunded at once; a run here stops at its next step, a run in
        another process when that process next checks (``stop_cancelled``, every heartbeat)."""
        ttl = timedelta(seconds=self.settings.task_ttl_s)
        view, cancelled = await self.ledger.run(lambda tx: tx.tasks.cancel(task_id=task_id, key_id=key.id, ttl=ttl))
        if cancelled:
            await self.model_engine.abort(task_id)
        return view, cancelled

    async def stop_cancelled(self) -> int:
        """Stop the tasks running here that were cancelled through another process; returns how many."""
        running = list(self._background)
        cancelled = await self.ledger.run(lambda tx: tx.tasks.cancelled_among(running))
        for task_id in cancelled:
            await self.model_engine.abort(task_id)
        return len(cancelled)

    async def drain(self, grace_s: float) -> None:
        """On shutdown: let accepted v2 tasks finish for up to ``grace_s``, then fail the rest (refunded)."""
        if self._background:
            log.info("waiting up to %.0f s for %d v2 task(s)", grace_s, len(self._background))
            _, pending = await asyncio.wait(set(self._background.values()), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # --- shared steps ---------------------------------------------------------------------------------------

    async def _check_storage(self, key: KeyInfo, *, synchronous: bool = False) -> None:
        """Refuse a request whose result would be stored (a v2 task's images; any route's answer to an
        Idempotency-Key) when stored results are at their budget (the key's, or the server's). Every stored byte
        counts, whichever route stored it."""
        per_key, total = self.settings.storage_per_key_mb * 2**20, self.settings.storage_total_mb * 2**20
        if synchronous:
            instead = "or send this request without an Idempotency-Key (its answer is then not stored)"
        else:
            instead = "or use the synchronous v1 endpoint without an Idempotency-Key, which stores nothing"
        if per_key and await self.ledger.run(lambda tx: tx.tasks.stored_bytes(key_id=key.id)) >= per_key:
            raise StorageFull(
                f"this key's stored results (v2 images and answers kept for Idempotency-Key retries) reached "
                f"{self.settings.storage_per_key_mb:g} MB (SD3SERVE_STORAGE_PER_KEY_MB): fetch them and let them "
                f"expire (v2 results {self.settings.task_ttl_s:g} s after they finish, idempotent answers after "
                f"24 hours), {instead}",
                server_wide=False,
            )
        if total and await self.ledger.run(lambda tx: tx.tasks.stored_bytes()) >= total:
            raise StorageFull(
                f"the server's stored results reached {self.settings.storage_total_mb:g} MB "
                "(SD3SERVE_STORAGE_TOTAL_MB); retry later",
                server_wide=True,
            )

    async def _check_webhook(self, key: KeyInfo, webhook: Webhook) -> None:
        """Refuse a webhook whose target may not be called, or a key with no secret to sign it with."""
        problem = await run_blocking(target_problem, webhook.url, allow_private=self.settings.webhook_allow_private)
        if problem is not None:
            raise InvalidRequest(problem)
        if not await self.ledger.run(lambda tx: tx.webhooks.has_secret(key_id=key.id)):
            raise InvalidRequest(
                "webhook_url: this key has no webhook secret yet; create one with POST /v1/webhook-secret "
                "(it is shown once) and verify deliveries with it"
            )

    async def _claim(
        self, key: KeyInfo, idempotency_key: str | None, order: Order
    ) -> tuple[Claim | None, bytes | None]:
        """(the claim to answer, None) for a new request; (None, the stored answer) for a retry. The order's
        fingerprint covers everything it asks for: the generation and, for v2, where and what to POST."""
        if idempotency_key is None:
            return None, None
        claim = Claim(key.id, idempotency_key)
        answer = await self.ledger.call(self.ledger.claim, claim, fingerprint=order.fingerprint)
        return (None, answer) if answer is not None else (claim, None)

    async def _abandon(self, claim: Claim) -> None:
        await self.ledger.run(lambda tx: tx.idempotency.abandon(claim))

    async def _balance(self, key: KeyInfo) -> float:
        return await self.ledger.run(lambda tx: tx.keys.balance(key.id))

    def _admit(self, job: GenerationJob) -> None:
        """Refuse, before any credit is held, what the server will not run: too much work for one request (400),
        or a full queue (503)."""
        check_adapters(lora_dir(self.settings), [name for name, _ in job.loras])
        limit = self.settings.max_request_work
        if limit and job.work > limit:
            raise InvalidRequest(
                f"too much work for one request: {job.width}x{job.height}, {job.batch_size} image(s), "
                f"{job.model_calls} model calls each = {job.work:.0f} megapixel model evaluations; this server allows "
                f"{limit:g} (SD3SERVE_MAX_REQUEST_WORK): use fewer steps, images or pixels"
            )
        self.model_engine.admit()

    async def _reserve(
        self, key: KeyInfo, job: GenerationJob, request_id: str, with_hold: HoldWork | None = None
    ) -> Reservation:
        return await self.ledger.call(self.ledger.reserve, key_id=key.id, credits=self.price(job),
                                      request_id=request_id, with_hold=with_hold)  # fmt: skip

    async def _persist(self, what: str, fn: Callable[..., object], *args: Any, **kwargs: Any) -> bool:
        """Write a task's outcome; if the database is away, keep trying (the images wait in memory). False if it
        never could; other errors (ReservationLost) propagate."""
        for attempt in range(PERSIST_ATTEMPTS):
            try:
                await self.ledger.call(fn, *args, **kwargs)
                return True
            except DBAPIError as e:
                if attempt == PERSIST_ATTEMPTS - 1:
                    log.error("could not %s: %s", what, e)
                    return False
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        return False

    async def _generate(self, order: Order, *, request_id: str, progress: Any = None) -> _Generated:
        """The order's encoded images. Engine failures become GenerationFailed; domain errors pass through."""
        job, output = order.job, order.output
        start = time.perf_counter()
        try:
            result = await self.model_engine.generate(job, request_id=request_id, progress=progress)
        except Aborted:
            raise
        except SD3ServeError:
            raise
        except Exception as e:
            raise GenerationFailed("image generation failed; nothing was charged") from e
        files = await run_blocking(
            lambda: [encode_image(im, output.image_format, output.quality) for im in result.images]
        )
        seconds = time.perf_counter() - start
        self.metrics.generation_seconds.observe(seconds)
        if result.prompt_truncated:
            log.info("request %s: the prompt is longer than the text encoders' windows and was truncated", request_id)
        return _Generated(files=files, seconds=seconds, prompt_truncated=result.prompt_truncated, steps=job.steps)

    def _count(self, job: GenerationJob, reservation: Reservation) -> None:
        self.metrics.images.inc(job.batch_size)
        self.metrics.credits_charged.inc(reservation.credits)


def _answering(claim: Claim, answer: bytes) -> HoldWork:
    """Record the claimed request's answer, in the transaction that charges it."""

    def record(tx: Tx, _hold: CreditHold) -> None:
        tx.idempotency.answer(claim, answer)

    return record


def _failing(task_id: str, *, error: str, ttl: timedelta) -> HoldWork:
    """Mark the task FAILED, in the transaction that refunds it."""

    def fail(tx: Tx, _hold: CreditHold) -> None:
        tx.tasks.fail(task_id, error=error, ttl=ttl)

    return fail


def _progress(task_id: str, step: int, steps: int) -> Callable[[Tx], None]:
    def record(tx: Tx) -> None:
        tx.tasks.set_progress(task_id, step=step, total=steps)

    return record


async def _first_or_gone(work: Awaitable[T], gone: Awaitable[None]) -> T:
    """``work``'s result, or ClientGone if ``gone`` finishes first (``work`` is then cancelled). An engine
    Aborted (this process was presumed dead) becomes ReservationLost: the hold is gone, retry."""
    work_task = asyncio.ensure_future(work)
    gone_task = asyncio.ensure_future(gone)
    try:
        await asyncio.wait({work_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone_task.cancel()
    if not work_task.done():
        work_task.cancel()
        await asyncio.gather(work_task, return_exceptions=True)
        raise ClientGone
    try:
        return work_task.result()
    except Aborted:
        raise ReservationLost(STOPPED) from None
