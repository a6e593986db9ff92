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
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, create_engine, delete, select, update
from sqlalchemy.orm import sessionmaker

from sd3serve.store.credits import CreditHold, lock_keys, make_engine, release_hold
from sd3serve.store.models import Hold, Instance, RateWindow, Task
from sd3serve.store.tasks import FAILED, RUNNING

log = logging.getLogger(__name__)

DIED_MESSAGE = "the server process running this task stopped; nothing was charged"


class Recovery:
    def __init__(
        self, engine: Engine, instance_id: str | None = None, *, heartbeat_engine: Engine | None = None
    ) -> None:
        self._session = sessionmaker(engine, expire_on_commit=False)
        self._beat_session = sessionmaker(heartbeat_engine or engine, expire_on_commit=False)
        self.instance_id = instance_id or uuid.uuid4().hex

    def register(self) -> None:
        with self._beat_session.begin() as s:
            s.merge(Instance(id=self.instance_id, heartbeat_at=datetime.now(UTC)))

    def heartbeat(self) -> bool:
        """Prove this process alive. False if another process declared it dead meanwhile (its tasks failed and
        its holds returned): the caller must abort what it still runs, whose holds are gone; this process then
        goes on under a new id, so work it admits from now on is its own again. Uses the heartbeat's own
        connection when one was given."""
        with self._beat_session.begin() as s:
            res = s.execute(
                update(Instance).where(Instance.id == self.instance_id).values(heartbeat_at=datetime.now(UTC))
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                return True
        log.error("process %s was presumed dead by another process; continuing under a new id", self.instance_id)
        self.instance_id = uuid.uuid4().hex
        self.register()
        return False

    def unregister(self) -> None:
        with self._session.begin() as s:
            s.execute(delete(Instance).where(Instance.id == self.instance_id))

    def settle_dead(self, *, dead_after: timedelta) -> int:
        """Fail the tasks and return the holds of every process whose heartbeat stopped, and of owners that are
        not registered at all (orphans older than ``dead_after``); returns how many owners were settled."""
        cutoff = datetime.now(UTC) - dead_after
        with self._session() as s:
            dead = set(
                s.scalars(
                    select(Instance.id).where(Instance.heartbeat_at < cutoff, Instance.id != self.instance_id)
                ).all()
            )
            live = select(Instance.id)
            dead |= set(s.scalars(select(Hold.owner).where(Hold.created_at < cutoff, Hold.owner.not_in(live))))
            dead |= set(
                s.scalars(
                    select(Task.owner).where(
                        Task.created_at < cutoff, Task.status.in_(RUNNING), Task.owner.not_in(live)
                    )
                )
            )
        dead.discard(self.instance_id)
        for owner in dead:
            self._settle(owner, cutoff)
        return len(dead)

    def _settle(self, owner: str, cutoff: datetime) -> None:
        now = datetime.now(UTC)
        with self._session.begin() as s:
            # Re-checked inside the transaction: a heartbeat since the first look means the owner lives.
            if s.scalars(select(Instance.id).where(Instance.id == owner, Instance.heartbeat_at >= cutoff)).first():
                return
            # The lock order: the keys concerned (lowest id first), then their tasks, then their holds. A hold or
            # task of another key that appeared meanwhile is left to the next round (it is then an orphan).
            keys = lock_keys(s, [
                *s.scalars(select(Task.key_id).where(Task.owner == owner, Task.status.in_(RUNNING))),
                *s.scalars(select(Hold.key_id).where(Hold.owner == owner)),
            ])  # fmt: skip
            tasks = len(
                s.execute(
                    update(Task)
                    .where(Task.owner == owner, Task.status.in_(RUNNING), Task.key_id.in_(keys))
                    .values(status=FAILED, error=DIED_MESSAGE, finished_at=now, expires_at=now + timedelta(hours=1))
                    .returning(Task.id)
                    .execution_options(synchronize_session=False)
                ).all()
            )
            holds = s.scalars(select(Hold).where(Hold.owner == owner, Hold.key_id.in_(keys)).order_by(Hold.id)).all()
            for h in holds:
                release_hold(s, CreditHold(id=h.id, key_id=h.key_id, amount_micro=h.amount_micro))
            s.execute(delete(Instance).where(Instance.id == owner))
        log.warning("process %s died: %d task(s) failed, %d hold(s) returned", owner, tasks, len(holds))

    def prune_rate_windows(self, *, before_window: int) -> None:
        with self._session.begin() as s:
            s.execute(delete(RateWindow).where(RateWindow.window < before_window))


def dedicated_engine(engine: Engine) -> Engine:
    """An engine of its own on the same database, for the heartbeat: its connection is never one that requests are
    queued for. An in-memory SQLite database cannot be shared by two engines: it keeps ``engine``."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            return engine
        return make_engine(url.render_as_string(hide_password=False))  # WAL and the busy timeout, as the store's
    return create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True)


class Heartbeat:
    """Proves this process alive every ``interval_s`` from a thread of its own, with its own database connection, so
    that a busy or blocked event loop (a flood of streams or downloads) never makes peers presume it dead.
    ``on_presumed_dead`` is called (on this thread) when a beat learns that a peer settled this process's work."""

    def __init__(self, recovery: Recovery, interval_s: float, on_presumed_dead: Callable[[], None]) -> None:
        self.recovery = recovery
        self.interval_s = interval_s
        self.on_presumed_dead = on_presumed_dead
        self.beats = 0  # successful beats (tests and metrics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and wait for a beat in progress (call before ``Recovery.unregister``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                alive = self.recovery.heartbeat()
            except Exception as e:  # the database may be away; try again next beat
                log.warning("heartbeat failed: %s", e)
                continue
            self.beats += 1
            if not alive:
                try:
                    self.on_presumed_dead()
                except Exception:
                    log.exception("stopping the work of a process presumed dead failed")
