"""v2 tasks, in the same database as the credits, so any server process can answer for any task.

A task is created with its hold, completed with its charge, failed or cancelled with its refund: each pair in
one transaction (the caller's, through these methods of :class:`Tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from sd3serve.errors import NotFound, ReservationLost
from sd3serve.ledger.credits import CreditHold, Credits, lock_keys
from sd3serve.ledger.schema import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PROCESSING,
    QUEUED,
    RUNNING,
    Hold,
    IdempotencyRecord,
    Task,
    TaskImage,
    TaskWebhook,
)

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "PROCESSING",
    "QUEUED",
    "RUNNING",
    "TaskProgress",
    "TaskView",
    "Tasks",
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


class Tasks:
    """The ``tasks`` rows and their images, in the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def create(
        self, *, task_id: str, key_id: int, hold: CreditHold, seed: int, base64: bool, media_type: str,
        request_json: str, owner: str,
    ) -> None:  # fmt: skip
        """A QUEUED task paid for by ``hold`` (created in this transaction)."""
        self.s.add(Task(id=task_id, key_id=key_id, status=QUEUED, seed=seed, base64=base64, media_type=media_type,
                        request_json=request_json, hold_id=hold.id, owner=owner))  # fmt: skip

    def complete(
        self, task_id: str, *, hold: CreditHold, images: list[bytes], inference_time: float, steps: int,
        ttl: timedelta,
    ) -> None:  # fmt: skip
        """Store the images and mark the task COMPLETED, only if it still runs on ``hold``: a task that another
        process settled already (FAILED when this one was presumed dead) raises ReservationLost, which rolls back
        the transaction and its charge with it."""
        now = datetime.now(UTC)
        done = self.s.execute(
            update(Task)
            .where(Task.id == task_id, Task.status.in_(RUNNING), Task.hold_id == hold.id)
            .values(
                status=COMPLETED, inference_time=inference_time, finished_at=now, expires_at=now + ttl,
                progress_step=steps, progress_total=steps,
            )
        )  # fmt: skip
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise ReservationLost(f"task {task_id} was settled elsewhere before its images were stored")
        self.s.add_all(TaskImage(task_id=task_id, index=i, data=data) for i, data in enumerate(images))

    def fail(self, task_id: str, *, error: str, ttl: timedelta) -> None:
        """Mark a running task FAILED (a finished one stays as it is)."""
        now = datetime.now(UTC)
        self.s.execute(
            update(Task)
            .where(Task.id == task_id, Task.status.in_(RUNNING))
            .values(status=FAILED, error=error, finished_at=now, expires_at=now + ttl)
        )

    def set_progress(self, task_id: str, *, step: int, total: int) -> None:
        self.s.execute(
            update(Task)
            .where(Task.id == task_id, Task.status.in_(RUNNING))
            .values(status=PROCESSING, progress_step=step, progress_total=total)
        )

    def hand_over(self, task_id: str, *, hold: CreditHold, owner: str, new_owner: str) -> bool:
        """Make ``new_owner`` the owner of the task and its hold if ``owner`` still has both; False if the hold was
        settled meanwhile (the submitter was presumed dead, or the task was cancelled)."""
        held = self.s.execute(update(Hold).where(Hold.id == hold.id, Hold.owner == owner).values(owner=new_owner))
        if held.rowcount != 1:  # type: ignore[attr-defined]
            return False
        self.s.execute(update(Task).where(Task.id == task_id, Task.owner == owner).values(owner=new_owner))
        return True

    def cancel_where(self, *where: Any, error: str, ttl: timedelta) -> list[str]:
        """Mark the running tasks matching ``where`` (whose keys the caller locked: ``lock_keys``) CANCELLED and
        return their holds. Returns the ids of the tasks this UPDATE changed, and only those: a task that completed
        or failed meanwhile is untouched (its hold was settled with it)."""
        now = datetime.now(UTC)
        rows = self.s.execute(
            update(Task)
            .where(*where, Task.status.in_(RUNNING))
            .values(status=CANCELLED, error=error, finished_at=now, expires_at=now + ttl)
            .returning(Task.id, Task.hold_id)
            .execution_options(synchronize_session=False)
        ).all()
        hold_ids = [r.hold_id for r in rows if r.hold_id is not None]
        if hold_ids:
            Credits(self.s).release_where(Hold.id.in_(hold_ids))
        return [r.id for r in rows]

    def cancel(self, *, task_id: str, key_id: int, ttl: timedelta) -> tuple[TaskView, bool]:
        """Cancel the caller's task if it still runs (CANCELLED, its hold returned); returns the task and whether
        this call cancelled it. A finished task is left as it is."""
        lock_keys(self.s, [key_id])  # the key, then the task, then its hold: the lock order
        mine = (Task.id == task_id, Task.key_id == key_id)
        cancelled = bool(self.cancel_where(*mine, error=CANCELLED_MESSAGE, ttl=ttl))
        # Read back in the same transaction, which holds the task's row: the answer is what the UPDATE left.
        task = self.s.execute(select(Task).where(*mine).execution_options(populate_existing=True)).scalar_one_or_none()
        if task is None:
            raise NotFound(f"no task {task_id!r} for this key")
        return TaskView.of(task, self._image_count(task_id)), cancelled

    def cancelled_among(self, task_ids: list[str]) -> list[str]:
        """Which of these tasks (run here) were cancelled meanwhile, by any process."""
        if not task_ids:
            return []
        return list(self.s.scalars(select(Task.id).where(Task.id.in_(task_ids), Task.status == CANCELLED)))

    def get(self, *, task_id: str, key_id: int) -> TaskView:
        """The caller's task; another key's task is NotFound, like a task that does not exist."""
        task = self._mine(task_id, key_id)
        return TaskView.of(task, self._image_count(task_id))

    def image(self, *, task_id: str, key_id: int, index: int) -> tuple[bytes, str]:
        task = self._mine(task_id, key_id)
        row = self.s.get(TaskImage, (task_id, index))
        if row is None:
            raise NotFound(f"task {task_id!r} has no image {index}")
        return row.data, task.media_type

    def images(self, *, task_id: str) -> list[bytes]:
        rows = self.s.scalars(select(TaskImage).where(TaskImage.task_id == task_id).order_by(TaskImage.index))
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
        return int(self.s.scalar(images) or 0) + int(self.s.scalar(answers) or 0)

    def delete_expired(self) -> int:
        now = datetime.now(UTC)
        ids = self.s.scalars(select(Task.id).where(Task.expires_at.is_not(None), Task.expires_at < now)).all()
        if ids:
            self.s.execute(delete(TaskImage).where(TaskImage.task_id.in_(ids)))
            self.s.execute(delete(TaskWebhook).where(TaskWebhook.task_id.in_(ids)))
            self.s.execute(delete(Task).where(Task.id.in_(ids)))
        return len(ids)

    def progress_of(self, task_ids: list[str]) -> dict[str, TaskProgress]:
        """The status and progress of these tasks, in one query (the event streams' poll); missing ones are left out."""
        if not task_ids:
            return {}
        columns = (Task.id, Task.status, Task.progress_step, Task.progress_total)
        rows = self.s.execute(select(*columns).where(Task.id.in_(task_ids))).all()
        return {r.id: TaskProgress(status=r.status, step=r.progress_step, steps=r.progress_total) for r in rows}

    def _mine(self, task_id: str, key_id: int) -> Task:
        task = self.s.get(Task, task_id, populate_existing=True)
        if task is None or task.key_id != key_id:
            raise NotFound(f"no task {task_id!r} for this key")
        return task

    def _image_count(self, task_id: str) -> int:
        return len(self.s.scalars(select(TaskImage.index).where(TaskImage.task_id == task_id)).all())
