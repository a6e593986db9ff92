"""The heartbeat thread (ledger/recovery.py ``Heartbeat``) and the ``instances`` rows it keeps fresh.

What the docstrings promise: a beat every ``interval_s`` on a thread of its own that never keeps the process from
exiting; a failing beat (the database away) is tried again at the next one; a beat that learns this process was
presumed dead calls ``on_presumed_dead`` once per such beat, and a failure there does not stop the beating; ``stop``
waits for a beat in progress. A registered process's heartbeat is now; a beat of a process whose row is gone says
so; settling a dead process fails its running tasks (not its finished ones) with the message and times of the
contract and counts what it did."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from helpers.ledger import Store, completion, creation, sharing
from sd3serve.ledger.recovery import DIED_MESSAGE, Heartbeat
from sd3serve.ledger.schema import COMPLETED, FAILED, Instance, Task
from waiting import wait_for


class Beats:
    """A ledger stand-in: each ``heartbeat`` answers the next scripted value (an exception is raised)."""

    def __init__(self, *answers: bool | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def heartbeat(self) -> bool:
        self.calls += 1
        self.entered.set()
        self.release.wait(30)
        answer = self.answers.pop(0) if self.answers else True
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_beats_run_on_a_daemon_thread_named_heartbeat() -> None:
    beats = Beats()
    hb = Heartbeat(beats, 0.01, on_presumed_dead=lambda: None)
    before = set(threading.enumerate())  # other tests' servers beat on threads of their own
    hb.start()
    try:
        wait_for(lambda: hb.beats >= 3, 10)
        (thread,) = [t for t in threading.enumerate() if t not in before and t.name == "heartbeat"]
        assert thread.daemon  # never keeps a process from exiting
    finally:
        hb.stop()
    assert thread not in threading.enumerate()


def test_a_failed_beat_is_tried_again_and_not_counted() -> None:
    beats = Beats(ConnectionError("database away"), ConnectionError("still away"), True)
    dead: list[int] = []
    hb = Heartbeat(beats, 0.01, on_presumed_dead=lambda: dead.append(1))
    hb.start()
    try:
        wait_for(lambda: hb.beats >= 1, 10)
    finally:
        hb.stop()
    assert beats.calls >= 3  # the failures did not end the thread
    assert hb.beats == beats.calls - 2  # only the beats that reached the database count
    assert dead == []  # a failed beat is not news of death


def test_presumed_dead_is_called_once_per_such_beat_and_a_failing_callback_does_not_stop_the_beats() -> None:
    beats = Beats(False, True, False, True)
    calls: list[int] = []

    def presumed_dead() -> None:
        calls.append(hb.beats)
        raise RuntimeError("aborting failed")

    hb = Heartbeat(beats, 0.01, on_presumed_dead=presumed_dead)
    hb.start()
    try:
        wait_for(lambda: hb.beats >= 5, 10)
    finally:
        hb.stop()
    assert calls == [1, 3]  # after the first and the third beat, each counted before the callback ran


def test_no_beat_before_the_first_interval_and_stop_waits_for_a_beat_in_progress() -> None:
    beats = Beats()
    hb = Heartbeat(beats, 0.3, on_presumed_dead=lambda: None)
    hb.start()
    assert beats.calls == 0  # the first beat comes one interval after start (register() was the first proof)
    beats.release.clear()
    assert beats.entered.wait(10)
    stopper = threading.Thread(target=hb.stop)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # stop() waits for the beat it interrupted
    beats.release.set()
    stopper.join(10)
    assert not stopper.is_alive() and hb.beats == 1


def test_stop_of_a_heartbeat_never_started_returns() -> None:
    hb = Heartbeat(Beats(), 0.01, on_presumed_dead=lambda: None)
    hb.stop()
    assert hb.beats == 0


def _heartbeat_of(store: Store, instance_id: str) -> datetime | None:
    with Session(store.engine) as s:
        at = s.scalar(select(Instance.heartbeat_at).where(Instance.id == instance_id))
    return None if at is None else at.replace(tzinfo=UTC)


def test_register_and_beat_set_the_heartbeat_to_now(store: Store) -> None:
    proc = sharing(store)
    before = datetime.now(UTC)
    proc.register()
    registered = _heartbeat_of(store, proc.instance_id)
    assert registered is not None and before <= registered <= datetime.now(UTC)
    with Session(store.engine) as s, s.begin():
        hour_ago = before - timedelta(hours=1)
        s.execute(update(Instance).where(Instance.id == proc.instance_id).values(heartbeat_at=hour_ago))
    before_beat = datetime.now(UTC)
    assert proc.heartbeat() is True
    beat = _heartbeat_of(store, proc.instance_id)
    assert beat is not None and before_beat <= beat <= datetime.now(UTC)
    # Registering again (after a restart under the same id) refreshes the row rather than failing.
    proc.register()
    again = _heartbeat_of(store, proc.instance_id)
    assert again is not None and again >= beat


def test_a_process_presumed_dead_goes_on_under_a_new_registered_id(store: Store) -> None:
    proc = sharing(store)
    proc.register()
    old = proc.instance_id
    proc.unregister()  # what a peer's settling does to its row
    assert proc.heartbeat() is False
    assert proc.instance_id != old
    assert _heartbeat_of(store, proc.instance_id) is not None and _heartbeat_of(store, old) is None
    assert proc.heartbeat() is True


def test_settling_fails_running_tasks_only_and_counts_tasks_and_holds(store: Store) -> None:
    peer, dead = sharing(store), sharing(store)
    peer.register()
    dead.register()
    key = store.create_key(credits=10)[0].id
    owner = dead.instance_id
    held = {task_id: store.reserve(key_id=key, credits=Decimal(1), request_id=task_id, owner=owner,
                                   with_hold=creation(task_id=task_id, key_id=key, seed=1, owner=owner))
            for task_id in ("t-run", "t-done")}  # fmt: skip
    store.capture(held["t-done"].hold, deliver=completion("t-done", images=[b"png"]))  # completed, its price paid
    store.reserve(key_id=key, credits=Decimal(2), request_id="v1", owner=owner)
    cutoff = datetime.now(UTC) + timedelta(seconds=1)  # everything registered so far is older
    before = datetime.now(UTC)
    with store.db.transaction() as tx:
        assert tx.instances.settle(dead.instance_id, cutoff=cutoff) == (1, 2)  # t-run; the holds of t-run and v1
    after = datetime.now(UTC)
    with Session(store.engine) as s:
        run = s.get(Task, "t-run")
        fin = s.get(Task, "t-done")
    assert run is not None and fin is not None
    assert run.status == FAILED and run.error == DIED_MESSAGE
    finished = run.finished_at.replace(tzinfo=UTC) if run.finished_at else None
    assert finished is not None and before <= finished <= after
    expires = run.expires_at.replace(tzinfo=UTC) if run.expires_at else None
    assert expires is not None and expires - finished == timedelta(hours=1)
    assert fin.status == COMPLETED and fin.error is None
    assert store.balance(key_id=key) == 9  # every hold returned; the completed task's price stays paid
    assert _heartbeat_of(store, dead.instance_id) is None
    assert dead.heartbeat() is False


@pytest.mark.parametrize("registered", [True, False], ids=["silent", "never registered"])
def test_dead_owners_are_the_silent_and_the_orphans_never_me(store: Store, registered: bool) -> None:
    me, other = sharing(store), sharing(store)
    me.register()
    if registered:
        other.register()
    key = store.create_key(credits=10)[0].id
    store.reserve(key_id=key, credits=Decimal(1), request_id="mine", owner=me.instance_id)
    store.reserve(key_id=key, credits=Decimal(1), request_id="theirs", owner=other.instance_id)
    later = datetime.now(UTC) + timedelta(seconds=1)
    with store.db.transaction() as tx:
        assert tx.instances.dead_owners(cutoff=later, me=me.instance_id) == {other.instance_id}
        # Before the cutoff nobody is dead, and the holds are too young to be orphans.
        assert tx.instances.dead_owners(cutoff=later - timedelta(hours=1), me=me.instance_id) == set()


@pytest.mark.usefixtures("west_of_utc")
def test_a_process_that_beats_is_alive_whatever_the_local_time_zone(store: Store) -> None:
    """Heartbeats are UTC: one written in local time would be 5 hours old at once, and peers would settle it."""
    peer, proc = sharing(store), sharing(store)
    peer.register()
    proc.register()
    key = store.create_key(credits=5)[0].id
    store.reserve(key_id=key, credits=Decimal(2), request_id="r", owner=proc.instance_id)
    assert peer.settle_dead(dead_after=timedelta(minutes=1)) == 0  # registered just now
    assert proc.heartbeat() is True
    assert peer.settle_dead(dead_after=timedelta(minutes=1)) == 0  # beat just now
    assert store.balance(key_id=key) == 3 and proc.heartbeat() is True


@pytest.mark.usefixtures("west_of_utc")
def test_a_fresh_hold_of_an_unregistered_owner_is_no_orphan_whatever_the_local_time_zone(store: Store) -> None:
    """Rows are stamped in UTC when they are made: a hold stamped in local time would look 5 hours old, and a
    peer would take it for an orphan at once and return it while its request still runs."""
    peer = sharing(store)
    peer.register()
    key = store.create_key(credits=5)[0].id
    store.reserve(key_id=key, credits=Decimal(2), request_id="r", owner="a process that has not registered yet")
    assert peer.settle_dead(dead_after=timedelta(minutes=1)) == 0
    assert store.balance(key_id=key) == 3
