"""Settling what a dead server process left behind, from any live one.

Each process registers in ``instances`` and refreshes its heartbeat. A process whose heartbeat is older than
``dead_after`` died (SIGKILL, power loss): its unfinished v2 tasks become FAILED and every hold it had goes
back to the balance, in one transaction per process, so no credit is lost and none is charged twice (a hold
that was captured no longer exists; a task that completed is not touched).

A process presumed dead may only have been paused (SIGSTOP, a long GC, a frozen VM). When it resumes, its
captures fail (the holds are gone) and its task completions fail (the tasks are FAILED), so nothing it made is
delivered unpaid; its next heartbeat tells it, and it aborts what it still runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from sd3serve.ledger.credits import Credits, lock_keys
from sd3serve.ledger.schema import FAILED, RUNNING, Hold, Instance, Task

log = logging.getLogger(__name__)

DIED_MESSAGE = "the server process running this task stopped; nothing was charged"


class Instances:
    """The ``instances`` rows (live server processes) and the settling of dead ones, in the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def register(self, instance_id: str) -> None:
        self.s.merge(Instance(id=instance_id, heartbeat_at=datetime.now(UTC)))

    def beat(self, instance_id: str) -> bool:
        """Refresh the heartbeat; False if the row is gone (another process settled this one as dead)."""
        res = self.s.execute(update(Instance).where(Instance.id == instance_id).values(heartbeat_at=datetime.now(UTC)))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def unregister(self, instance_id: str) -> None:
        self.s.execute(delete(Instance).where(Instance.id == instance_id))

    def dead_owners(self, *, cutoff: datetime, me: str) -> set[str]:
        """Processes silent since ``cutoff``, and owners of holds or running tasks older than it that are not
        registered at all (orphans); never ``me``."""
        dead = set(self.s.scalars(select(Instance.id).where(Instance.heartbeat_at < cutoff, Instance.id != me)))
        live = select(Instance.id)
        dead |= set(self.s.scalars(select(Hold.owner).where(Hold.created_at < cutoff, Hold.owner.not_in(live))))
        dead |= set(
            self.s.scalars(
                select(Task.owner).where(Task.created_at < cutoff, Task.status.in_(RUNNING), Task.owner.not_in(live))
            )
        )
        dead.discard(me)
        return dead

    def settle(self, owner: str, *, cutoff: datetime) -> tuple[int, int] | None:
        """Fail the running tasks of ``owner`` and return its holds, unless it beat since ``cutoff`` (None then).
        Returns (tasks failed, holds returned)."""
        now = datetime.now(UTC)
        # Re-checked inside the transaction: a heartbeat since the first look means the owner lives.
        if self.s.scalars(select(Instance.id).where(Instance.id == owner, Instance.heartbeat_at >= cutoff)).first():
            return None
        # The lock order: the keys concerned (lowest id first), then their tasks, then their holds. A hold or task
        # of another key that appeared meanwhile is left to the next round (it is then an orphan).
        keys = lock_keys(self.s, [
            *self.s.scalars(select(Task.key_id).where(Task.owner == owner, Task.status.in_(RUNNING))),
            *self.s.scalars(select(Hold.key_id).where(Hold.owner == owner)),
        ])  # fmt: skip
        tasks = len(
            self.s.execute(
                update(Task)
                .where(Task.owner == owner, Task.status.in_(RUNNING), Task.key_id.in_(keys))
                .values(status=FAILED, error=DIED_MESSAGE, finished_at=now, expires_at=now + timedelta(hours=1))
                .returning(Task.id)
                .execution_options(synchronize_session=False)
            ).all()
        )
        holds = Credits(self.s).release_where(Hold.owner == owner, Hold.key_id.in_(keys))
        self.s.execute(delete(Instance).where(Instance.id == owner))
        return tasks, holds


class Beating(Protocol):
    def heartbeat(self) -> bool: ...


class Heartbeat:
    """Proves this process alive every ``interval_s`` from a thread of its own, with its own database connection, so
    that a busy or blocked event loop (a flood of streams or downloads) never makes peers presume it dead.
    ``on_presumed_dead`` is called (on this thread) when a beat learns that a peer settled this process's work."""

    def __init__(self, ledger: Beating, interval_s: float, on_presumed_dead: Callable[[], None]) -> None:
        self.ledger = ledger
        self.interval_s = interval_s
        self.on_presumed_dead = on_presumed_dead
        self.beats = 0  # successful beats (tests and metrics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and wait for a beat in progress (call before ``Ledger.unregister``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                alive = self.ledger.heartbeat()
            except Exception as e:  # the database may be away; try again next beat
                log.warning("heartbeat failed: %s", e)
                continue
            self.beats += 1
            if not alive:
                try:
                    self.on_presumed_dead()
                except Exception:
                    log.exception("stopping the work of a process presumed dead failed")
