"""v2 tasks in the same database as the credits, so any server process can answer for any task.

A task's completion and its charge commit in one transaction, as do its failure and its refund.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from sd3serve.errors import NotFound, ReservationLost
from sd3serve.store.credits import CreditHold, SessionStep, cancel_tasks, lock_keys
from sd3serve.store.models import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PROCESSING,
    QUEUED,
    RUNNING,
    IdempotencyRecord,
    Task,
    TaskImage,
    TaskWebhook,
)

__all__ = [
    "CANCELLED", "COMPLETED", "FAILED", "PROCESSING", "QUEUED", "RUNNING", "TaskProgress", "TaskStore", "TaskView",
]  # fmt: skip


@dataclass(frozen=True)
class TaskView:
    id: str
    status: str
    seed: int
    base64: bool
    media_type: str
    progress_step: int
    progress_total: int
    error: str | None
    inference_time: float | None
    image_count: int

    @classmethod
    def of(cls, t: Task, image_count: int) -> TaskView:
        return cls(
            id=t.id, status=t.status, seed=t.seed, base64=t.base64, media_type=t.media_type,
            progress_step=t.progress_step, progress_total=t.progress_total, error=t.error,
            inference_time=t.inference_time, image_count=image_count,
        )  # fmt: skip


@dataclass(frozen=True)
class TaskProgress:
    """Where a task is: its status and (step, steps)."""

    status: str
    step: int
    steps: int


CANCELLED_MESSAGE = "cancelled; nothing was charged"


class TaskStore:
    def __init__(self, engine: Engine) -> None:
        self._session = sessionmaker(engine, expire_on_commit=False)

    # Each of these returns a step for the credit store's transaction (``CreditStore.reserve / capture /
    # release``): a task is created with its hold, completed with its charge and failed with its refund.

    @staticmethod
    def creation(
        *, task_id: str, key_id: int, seed: int, base64: bool, media_type: str, request_json: str, owner: str
    ) -> SessionStep:
        def create(s: Session, hold: CreditHold) -> None:
            s.add(Task(id=task_id, key_id=key_id, status=QUEUED, seed=seed, base64=base64, media_type=media_type,
                       request_json=request_json, hold_id=hold.id, owner=owner))  # fmt: skip

        return create

    @staticmethod
    def completion(
        task_id: str, *, images: list[bytes], inference_time: float, steps: int, ttl: timedelta
    ) -> SessionStep:
        """Store the images and mark the task COMPLETED, only if it is still running: a task that another
        process already settled (FAILED when this one was presumed dead) raises ReservationLost, which rolls
        the charge back with it."""

        def complete(s: Session, hold: CreditHold) -> None:
            now = datetime.now(UTC)
            done = s.execute(
                update(Task)
                .where(Task.id == task_id, Task.status.in_(RUNNING), Task.hold_id == hold.id)
                .values(
                    status=COMPLETED, inference_time=inference_time, finished_at=now, expires_at=now + ttl,
                    progress_step=steps, progress_total=steps,
                )
            )  # fmt: skip
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise ReservationLost(f"task {task_id} was settled elsewhere before its images were stored")
            s.add_all(TaskImage(task_id=task_id, index=i, data=data) for i, data in enumerate(images))

        return complete

    @staticmethod
    def failure(task_id: str, *, error: str, ttl: timedelta) -> SessionStep:
        """Mark a running task FAILED (a finished one stays as it is)."""

        def fail(s: Session, _hold: CreditHold) -> None:
            now = datetime.now(UTC)
            s.execute(
                update(Task)
                .where(Task.id == task_id, Task.status.in_(RUNNING))
                .values(status=FAILED, error=error, finished_at=now, expires_at=now + ttl)
            )

        return fail

    def set_progress(self, task_id: str, *, step: int, total: int) -> None:
        with self._session.begin() as s:
            s.execute(
                update(Task)
                .where(Task.id == task_id, Task.status.in_(RUNNING))
                .values(status=PROCESSING, progress_step=step, progress_total=total)
            )

    def cancel(self, *, task_id: str, key_id: int, ttl: timedelta) -> tuple[TaskView, bool]:
        """Cancel the caller's task if it still runs (CANCELLED, its hold returned, in one transaction); returns
        the task and whether this call cancelled it. A finished task is left as it is."""
        with self._session.begin() as s:
            lock_keys(s, [key_id])  # the key, then the task, then its hold: the lock order
            mine = (Task.id == task_id, Task.key_id == key_id)
            cancelled = bool(cancel_tasks(s, *mine, error=CANCELLED_MESSAGE, ttl=ttl))
            # Read back in the same transaction, which holds the task's row: the answer is what the UPDATE left.
            task = s.execute(select(Task).where(*mine).execution_options(populate_existing=True)).scalar_one_or_none()
            if task is None:
                raise NotFound(f"no task {task_id!r} for this key")
            count = len(s.scalars(select(TaskImage.index).where(TaskImage.task_id == task_id)).all())
            return TaskView.of(task, count), cancelled

    def cancelled_among(self, task_ids: list[str]) -> list[str]:
        """Which of these tasks (run here) were cancelled meanwhile, by any process."""
        if not task_ids:
            return []
        with self._session() as s:
            return list(s.scalars(select(Task.id).where(Task.id.in_(task_ids), Task.status == CANCELLED)))

    def get(self, *, task_id: str, key_id: int) -> TaskView:
        """The caller's task; another key's task is NotFound, like a task that does not exist."""
        with self._session() as s:
            task = s.get(Task, task_id)
            if task is None or task.key_id != key_id:
                raise NotFound(f"no task {task_id!r} for this key")
            count = len(s.scalars(select(TaskImage.index).where(TaskImage.task_id == task_id)).all())
            return TaskView.of(task, count)

    def image(self, *, task_id: str, key_id: int, index: int) -> tuple[bytes, str]:
        with self._session() as s:
            task = s.get(Task, task_id)
            if task is None or task.key_id != key_id:
                raise NotFound(f"no task {task_id!r} for this key")
            row = s.get(TaskImage, (task_id, index))
            if row is None:
                raise NotFound(f"task {task_id!r} has no image {index}")
            return row.data, task.media_type

    def images(self, *, task_id: str) -> list[bytes]:
        with self._session() as s:
            rows = s.scalars(select(TaskImage).where(TaskImage.task_id == task_id).order_by(TaskImage.index))
            return [r.data for r in rows]

    def stored_bytes(self, *, key_id: int | None = None) -> int:
        """Bytes of stored results (v2 images and idempotent answers), of one key or of everyone."""
        images = select(func.coalesce(func.sum(func.length(TaskImage.data)), 0)).join(
            Task, Task.id == TaskImage.task_id
        )
        answers = select(func.coalesce(func.sum(func.length(IdempotencyRecord.answer)), 0))
        if key_id is not None:
            images = images.where(Task.key_id == key_id)
            answers = answers.where(IdempotencyRecord.key_id == key_id)
        with self._session() as s:
            return int(s.scalar(images) or 0) + int(s.scalar(answers) or 0)

    def delete_expired(self) -> int:
        now = datetime.now(UTC)
        with self._session.begin() as s:
            ids = s.scalars(select(Task.id).where(Task.expires_at.is_not(None), Task.expires_at < now)).all()
            if ids:
                s.execute(delete(TaskImage).where(TaskImage.task_id.in_(ids)))
                s.execute(delete(TaskWebhook).where(TaskWebhook.task_id.in_(ids)))
                s.execute(delete(Task).where(Task.id.in_(ids)))
            return len(ids)

    def progress_of(self, task_ids: list[str]) -> dict[str, TaskProgress]:
        """The status and progress of these tasks, in one query (the event streams' poll); missing ones are left out."""
        if not task_ids:
            return {}
        columns = (Task.id, Task.status, Task.progress_step, Task.progress_total)
        with self._session() as s:
            rows = s.execute(select(*columns).where(Task.id.in_(task_ids))).all()
        return {r.id: TaskProgress(status=r.status, step=r.progress_step, steps=r.progress_total) for r in rows}
