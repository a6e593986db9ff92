"""Cancel, revoke and recovery racing a v2 task's completion, on SQLite and PostgreSQL.

Every answer about money comes from the rows the transaction changed (a cancel that lost the race says so), and
no two of these transactions wait on each other in a cycle (on PostgreSQL that is a deadlock: a 503 for a client).
The races are forced into their worst order (tests/interleave.py), then run freely many times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError

from helpers.ledger import Store, completion, creation, open_store, sharing
from helpers.races import race_cancel_and_completion
from interleave import first_write, interleave, statement
from sd3serve.errors import NotFound, ReservationLost
from sd3serve.ledger import Reservation
from sd3serve.ledger.keys import REVOKED_MESSAGE
from sd3serve.ledger.recovery import DIED_MESSAGE
from sd3serve.ledger.schema import Task
from sd3serve.ledger.tasks import CANCELLED_MESSAGE

TTL = timedelta(hours=1)


def _task(credits: Store, task_id: str, key_id: int, *, owner: str = "me") -> Reservation:
    create = creation(task_id=task_id, key_id=key_id, seed=1, base64=False, media_type="image/png",
                                request_json="{}", owner=owner)  # fmt: skip
    return credits.reserve(key_id=key_id, credits=Decimal(2), request_id=task_id, owner=owner, with_hold=create)


def _complete(reservation: Reservation, task_id: str) -> float:
    deliver = completion(task_id, images=[b"png"], inference_time=0.1, steps=2, ttl=TTL)
    return reservation.capture(deliver=deliver)


def _money(credits: Store, key_id: int) -> tuple[float, float]:
    key = credits.get_key(key_id=key_id)
    return key.credits, key.spent


def _no_database_error(*outcomes: object) -> None:
    for out in outcomes:
        error = getattr(out, "error", None)
        assert not isinstance(error, DBAPIError), f"a database error (deadlock?) reached the caller: {error}"


# --- the answer of a cancel that lost the race -------------------------------------------------------------


def test_a_cancel_that_lost_to_completion_says_so(stores: tuple[Store, Store]) -> None:
    """Completion commits after the cancel looked but before it wrote: the cancel must answer cancelled=false
    with COMPLETED, and the task stays charged (was: cancelled=true, 'nothing was charged', while charged)."""
    credits, tasks = stores
    key = credits.create_key(credits=5)[0].id
    res = _task(credits, "t", key)
    a, b = interleave(
        credits.engine,
        lambda: tasks.cancel(task_id="t", key_id=key, ttl=TTL),
        first_write,
        lambda: _complete(res, "t"),
    )
    view, cancelled = a.get()
    assert b.get() == 3
    assert (cancelled, view.status, view.image_count) == (False, "COMPLETED", 1)
    assert _money(credits, key) == (3, 2)


# --- one lock order: no deadlock whichever side goes first (PostgreSQL) ------------------------------------


@pytest.fixture
def pg(pg_database: str) -> Iterator[tuple[Store, Store]]:
    """The stores on PostgreSQL only: row locks, and so deadlocks, are PostgreSQL's (SQLite has one writer)."""
    credits = open_store(pg_database)
    credits.create_schema()
    try:
        yield credits, credits
    finally:
        credits.close()
        with psycopg.connect(pg_database, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")


def test_a_cancel_that_won_refunds_and_the_completion_delivers_nothing(
    pg: tuple[Store, Store],
) -> None:
    """The cancel holds the key (PostgreSQL) when the completion comes: the completion waits, then finds the
    task cancelled and its hold returned, and delivers and charges nothing."""
    credits, tasks = pg
    key = credits.create_key(credits=5)[0].id
    res = _task(credits, "t", key)
    a, b = interleave(
        credits.engine,
        lambda: tasks.cancel(task_id="t", key_id=key, ttl=TTL),
        statement("UPDATE tasks"),
        lambda: _complete(res, "t"),
    )
    view, cancelled = a.get()
    assert isinstance(b.error, ReservationLost)
    assert (cancelled, view.status, view.error, view.image_count) == (True, "CANCELLED", CANCELLED_MESSAGE, 0)
    assert _money(credits, key) == (5, 0)


def test_completion_holding_its_locks_then_cancel(pg: tuple[Store, Store]) -> None:
    """Completion is about to mark the task while the cancel comes in: the cancel waits, then says it lost."""
    credits, tasks = pg
    key = credits.create_key(credits=5)[0].id
    res = _task(credits, "t", key)
    a, b = interleave(
        credits.engine,
        lambda: _complete(res, "t"),
        statement("UPDATE tasks"),
        lambda: tasks.cancel(task_id="t", key_id=key, ttl=TTL),
    )
    _no_database_error(a, b)
    assert a.get() == 3
    view, cancelled = b.get()
    assert (cancelled, view.status) == (False, "COMPLETED")
    assert _money(credits, key) == (3, 2)


def test_revoke_holding_its_locks_then_completion(pg: tuple[Store, Store]) -> None:
    credits, tasks = pg
    key = credits.create_key(credits=5)[0].id
    res = _task(credits, "t", key)
    a, b = interleave(
        credits.engine, lambda: credits.revoke(key_id=key), statement("UPDATE tasks"), lambda: _complete(res, "t")
    )
    _no_database_error(a, b)
    assert a.get().revoked
    assert isinstance(b.error, ReservationLost)
    view = tasks.get(task_id="t", key_id=key)
    assert (view.status, view.error) == ("CANCELLED", REVOKED_MESSAGE)
    assert _money(credits, key) == (5, 0)


def test_completion_holding_its_locks_then_revoke(pg: tuple[Store, Store]) -> None:
    credits, tasks = pg
    key = credits.create_key(credits=5)[0].id
    res = _task(credits, "t", key)
    a, b = interleave(
        credits.engine, lambda: _complete(res, "t"), statement("UPDATE tasks"), lambda: credits.revoke(key_id=key)
    )
    _no_database_error(a, b)
    assert a.get() == 3 and b.get().revoked
    assert tasks.get(task_id="t", key_id=key).status == "COMPLETED"
    assert _money(credits, key) == (3, 2)


def _settle(credits: Store) -> Callable[[], int]:
    return lambda: sharing(credits, instance_id="live").settle_dead(dead_after=timedelta(0))


def test_completion_of_a_presumed_dead_process_then_recovery(pg: tuple[Store, Store]) -> None:
    """A process that was presumed dead (not registered) completes its task while another settles it."""
    credits, tasks = pg
    key = credits.create_key(credits=5)[0].id
    res = _task(credits, "t", key, owner="paused")
    a, b = interleave(credits.engine, lambda: _complete(res, "t"), statement("UPDATE tasks"), _settle(credits))
    _no_database_error(a, b)
    assert a.get() == 3
    assert tasks.get(task_id="t", key_id=key).status == "COMPLETED"
    assert _money(credits, key) == (3, 2)


def test_recovery_holding_its_locks_then_completion(pg: tuple[Store, Store]) -> None:
    credits, tasks = pg
    key = credits.create_key(credits=5)[0].id
    res = _task(credits, "t", key, owner="paused")
    a, b = interleave(credits.engine, _settle(credits), statement("UPDATE tasks"), lambda: _complete(res, "t"))
    _no_database_error(a, b)
    assert a.get() == 1
    assert isinstance(b.error, ReservationLost)
    view = tasks.get(task_id="t", key_id=key)
    assert (view.status, view.error) == ("FAILED", DIED_MESSAGE)
    assert _money(credits, key) == (5, 0)


def test_recovery_of_two_keys_racing_both_completions(pg: tuple[Store, Store]) -> None:
    """Store locks several keys (lowest id first); completions of each key in the middle never deadlock."""
    credits, tasks = pg
    k1, k2 = (credits.create_key(credits=5)[0].id for _ in range(2))
    r1, r2 = _task(credits, "t1", k1, owner="paused"), _task(credits, "t2", k2, owner="paused")

    def both() -> tuple[object, object]:
        outs = []
        for res, tid in ((r2, "t2"), (r1, "t1")):
            try:
                outs.append(_complete(res, tid))
            except ReservationLost as e:
                outs.append(e)
        return outs[0], outs[1]

    a, b = interleave(credits.engine, _settle(credits), first_write, both)
    _no_database_error(a, b)
    done = {t: tasks.get(task_id=t, key_id=k).status for t, k in (("t1", k1), ("t2", k2))}
    for tid, key in (("t1", k1), ("t2", k2)):
        charged = done[tid] == "COMPLETED"
        assert done[tid] in ("COMPLETED", "FAILED")
        assert _money(credits, key) == ((3, 2) if charged else (5, 0))


# --- free races, many times ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rounds", [40])
def test_cancel_and_completion_race_freely(stores: tuple[Store, Store], rounds: int) -> None:
    """Two threads released together, ``rounds`` times: every cancel answer matches the money, no database error."""
    credits, tasks = stores
    key = credits.create_key(credits=2 * rounds)[0].id
    won = 0
    for i in range(rounds):
        tid = f"race-{i}"
        res = _task(credits, tid, key)
        answer, complete = race_cancel_and_completion(tasks, res, task_id=tid, key_id=key)
        assert isinstance(answer, tuple), f"the cancel failed: {answer}"
        view, cancelled = answer
        assert not isinstance(complete, DBAPIError), complete
        if cancelled:
            won += 1
            assert view.status == "CANCELLED" and isinstance(complete, ReservationLost)
        else:
            assert view.status == "COMPLETED" and complete == "ok"
        assert tasks.get(task_id=tid, key_id=key).status == view.status
    assert _money(credits, key) == (won * 2, (rounds - won) * 2)


# --- two keys ------------------------------------------------------------------------------------------------


def test_one_key_cannot_cancel_or_read_another_keys_task(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    a, b = (credits.create_key(credits=5)[0].id for _ in range(2))
    _task(credits, "a-task", a)
    with pytest.raises(NotFound):
        tasks.cancel(task_id="a-task", key_id=b, ttl=TTL)
    assert tasks.get(task_id="a-task", key_id=a).status == "QUEUED"
    assert _money(credits, a) == (3, 0) and _money(credits, b) == (5, 0)


def test_revoking_one_key_leaves_another_keys_tasks_and_credits(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    a, b = (credits.create_key(credits=5)[0].id for _ in range(2))
    _task(credits, "a1", a)
    rb = _task(credits, "b1", b)
    _task(credits, "b2", b)
    credits.revoke(key_id=a)
    assert tasks.get(task_id="a1", key_id=a).status == "CANCELLED"
    assert [tasks.get(task_id=t, key_id=b).status for t in ("b1", "b2")] == ["QUEUED", "QUEUED"]
    assert _money(credits, a) == (5, 0) and _money(credits, b) == (1, 0)
    assert _complete(rb, "b1") == 1  # b's task still completes and is charged to b alone
    assert _money(credits, b) == (1, 2)


def test_a_revoked_key_gets_no_credits_and_another_key_still_does(stores: tuple[Store, Store]) -> None:
    from sd3serve.errors import InvalidRequest

    credits, _ = stores
    a, b = (credits.create_key(credits=5)[0].id for _ in range(2))
    credits.revoke(key_id=a)
    with pytest.raises(InvalidRequest, match="revoked"):
        credits.add_credits(key_id=a, credits=Decimal(1))
    assert _money(credits, a) == (5, 0)
    assert credits.add_credits(key_id=b, credits=Decimal(1)).credits == 6


def test_cancel_of_a_finished_task_changes_nothing(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    key = credits.create_key(credits=5)[0].id
    _complete(_task(credits, "t", key), "t")
    with credits.engine.begin() as conn:  # an unrelated write between: the answer is read, not assumed
        conn.execute(update(Task).where(Task.id == "t").values(progress_step=2))
    view, cancelled = tasks.cancel(task_id="t", key_id=key, ttl=TTL)
    assert (cancelled, view.status) == (False, "COMPLETED")
    assert _money(credits, key) == (3, 2)
