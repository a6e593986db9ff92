"""Promises of the ledger's repositories that touch one row among several: an idempotent answer is written to its
own claim only (not to another claim of the same key); a task handed to another process takes its own hold along,
and no other hold of its submitter; times are UTC whatever the server's local time zone; SQLite gives the pages of
deleted rows back to the file system."""

from __future__ import annotations

import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from helpers.ledger import Store, answered, completion, creation, open_store, sharing
from sd3serve.errors import IdempotencyInProgress
from sd3serve.ledger.idempotency import Claim, fingerprint
from sd3serve.ledger.schema import Hold, IdempotencyRecord, RateWindow, Task


def test_an_answer_is_written_to_its_own_claim_only(store: Store) -> None:
    key = store.create_key(credits=5)[0].id
    body = fingerprint("v1", "{}")
    for idem_key in ("first", "second"):
        assert store.begin(key_id=key, idem_key=idem_key, fingerprint=body) is None  # both running
    reservation = store.reserve(key_id=key, credits=Decimal(1), request_id="r1")
    reservation.capture(deliver=answered(Claim(key, "first"), b"answer of first"))
    assert store.begin(key_id=key, idem_key="first", fingerprint=body) == b"answer of first"
    with pytest.raises(IdempotencyInProgress):  # "second" still runs: it has no answer, least of all first's
        store.begin(key_id=key, idem_key="second", fingerprint=body)


def test_a_handed_over_task_takes_its_own_hold_only(store: Store) -> None:
    key = store.create_key(credits=5)[0].id
    held = {task_id: store.reserve(key_id=key, credits=Decimal(1), request_id=task_id, owner="submitter",
                                   with_hold=creation(task_id=task_id, key_id=key, seed=1, owner="submitter"))
            for task_id in ("t1", "t2")}  # fmt: skip
    assert store.hand_over("t1", hold=held["t1"].hold, owner="submitter", new_owner="runner")
    with Session(store.engine) as s:
        holds = {r.request_id: r.owner for r in s.execute(select(Hold.request_id, Hold.owner))}
        tasks = {r.id: r.owner for r in s.execute(select(Task.id, Task.owner))}
    assert holds == {"t1": "runner", "t2": "submitter"}
    assert tasks == {"t1": "runner", "t2": "submitter"}


@pytest.mark.usefixtures("west_of_utc")
def test_a_dead_processs_failed_task_is_kept_its_hour_whatever_the_local_time_zone(store: Store) -> None:
    """Its expiry is an hour after the settling in UTC: read in local time it would be four hours past already,
    and housekeeping would delete the task before its client could read why it failed."""
    peer, dead = sharing(store), sharing(store)
    peer.register()
    dead.register()
    key = store.create_key(credits=5)[0].id
    store.reserve(key_id=key, credits=Decimal(1), request_id="t", owner=dead.instance_id,
                  with_hold=creation(task_id="t", key_id=key, seed=1, owner=dead.instance_id))  # fmt: skip
    assert peer.settle_dead(dead_after=timedelta(seconds=-1)) == 1  # any heartbeat is "too old"
    assert store.get(task_id="t", key_id=key).status == "FAILED"
    assert store.delete_expired() == 0
    assert store.get(task_id="t", key_id=key).status == "FAILED"


def test_sqlite_gives_the_pages_of_expired_results_back(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = open_store(f"sqlite:///{path}")
    store.create_schema()
    try:
        key = store.create_key(credits=5)[0].id
        body = fingerprint("v1", "{}")
        for i in range(8):
            assert store.begin(key_id=key, idem_key=f"k{i}", fingerprint=body) is None
            with store.transaction() as tx:
                tx.idempotency.answer(Claim(key, f"k{i}"), bytes(256 * 1024))
        with Session(store.engine) as s, s.begin():
            s.execute(update(IdempotencyRecord).values(created_at=IdempotencyRecord.created_at - timedelta(days=2)))
        with store.transaction() as tx:
            assert tx.idempotency.delete_expired() == 8
        free_before = _freelist(store)
        assert free_before * 4096 >= 8 * 256 * 1024 * 0.9  # the deleted answers' pages are free, still in the file
        store.reclaim()
        assert _freelist(store) == 0
    finally:
        store.close()


def _freelist(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA freelist_count").scalar_one())


def test_releasing_a_hold_twice_returns_it_once_and_says_so(store: Store) -> None:
    key = store.create_key(credits=5)[0].id
    hold = store.reserve(key_id=key, credits=Decimal(2), request_id="r").hold
    with store.transaction() as tx:
        assert tx.credits.release(hold) is True
    with store.transaction() as tx:
        assert tx.credits.release(hold) is False  # gone: settled before
    assert store.balance(key_id=key) == 5


def test_blocking_calls_run_as_many_at_once_as_the_pool_has_connections(store_url: str) -> None:
    """``Ledger.call`` runs at most as many calls at once as the engine's pool has connections, and at least 4:
    PostgreSQL's pool of 10 plus 20 overflow; SQLite's file pool (5 plus 10)."""
    expected = 30 if store_url.startswith("postgresql") else 15
    store = open_store(store_url)
    try:
        assert store.ledger._connections() == expected
    finally:
        store.close()


def test_capturing_a_hold_twice_charges_once_and_says_so(store: Store) -> None:
    key = store.create_key(credits=5)[0].id
    reservation = store.reserve(key_id=key, credits=Decimal(2), request_id="r")
    with store.transaction() as tx:
        assert tx.credits.capture(reservation.hold) is True
    with store.transaction() as tx:
        assert tx.credits.capture(reservation.hold) is False  # gone: settled before
    assert store.balance(key_id=key) == 3 and store.get_key(key_id=key).spent == 2


def test_a_captured_reservation_is_settled_and_closing_it_changes_nothing(store: Store) -> None:
    key = store.create_key(credits=5)[0].id
    reservation = store.reserve(key_id=key, credits=Decimal(2), request_id="r")
    assert not reservation.settled
    assert reservation.capture() == 3  # the balance this capture left
    assert reservation.settled  # the caller's `finally: close()` makes no trip to the database
    reservation.close()
    assert store.balance(key_id=key) == 3


def test_a_key_spent_to_nothing_has_a_balance_of_exactly_zero(store: Store) -> None:
    key = store.create_key(credits=2)[0].id
    assert store.reserve(key_id=key, credits=Decimal(2), request_id="r").capture() == 0
    with store.transaction() as tx:
        assert tx.credits.balance_micro(key) == 0


def test_locking_a_key_lets_other_transactions_insert_rows_that_refer_to_it(pg_database: str) -> None:
    """``lock_keys`` locks as an UPDATE of non-key columns does (FOR NO KEY UPDATE): a concurrent insert of a row
    with a foreign key to it (an idempotency claim, a hold of another request) only needs FOR KEY SHARE and goes on;
    FOR UPDATE would make it wait for the whole transaction."""
    from sqlalchemy import text

    from sd3serve.ledger.credits import lock_keys

    store = open_store(pg_database)
    store.create_schema()
    try:
        key = store.create_key(credits=5)[0].id
        with store.transaction() as locking:
            assert lock_keys(locking.session, [key, key, 10**9]) == [key]  # the keys that exist, once
            with store.transaction() as other:
                other.session.execute(text("SET LOCAL lock_timeout = '2s'"))
                other.idempotency.insert_claim(Claim(key, "concurrent"), fingerprint="f")  # no wait
    finally:
        with store.transaction() as tx:
            tx.session.execute(text("DROP SCHEMA public CASCADE"))
            tx.session.execute(text("CREATE SCHEMA public"))
        store.close()


def test_keys_are_locked_lowest_id_first(store: Store) -> None:
    """The lock order starts with the keys, lowest id first, whatever order the caller names them in: the
    statement says so (two transactions locking the same keys then never wait for each other in a cycle)."""
    from sqlalchemy import event

    from sd3serve.ledger.credits import lock_keys

    keys = [store.create_key(credits=1)[0].id for _ in range(3)]
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        with store.transaction() as tx:
            assert lock_keys(tx.session, keys[::-1]) == keys
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    (select_sql,) = [s for s in statements if "FROM api_keys" in s]
    assert select_sql.rstrip().endswith("ORDER BY api_keys.id" + ("" if store.db.dialect == "sqlite" else
                                                                  " FOR NO KEY UPDATE"))  # fmt: skip


def test_housekeeping_counts_what_it_deleted_and_keeps_the_last_two_rate_windows(store: Store) -> None:
    key = store.create_key(credits=5)[0].id
    reservation = store.reserve(key_id=key, credits=Decimal(1), request_id="t",
                                with_hold=creation(task_id="t", key_id=key, seed=1))  # fmt: skip
    reservation.capture(deliver=completion("t", images=[b"png"], ttl=timedelta(seconds=-1)))  # expired at once
    assert store.begin(key_id=key, idem_key="old", fingerprint="f") is None
    with Session(store.engine) as s, s.begin():
        s.execute(update(IdempotencyRecord).values(created_at=IdempotencyRecord.created_at - timedelta(days=2)))
    minute = int(time.time() // 60)
    for window in (minute - 5, minute - 2, minute - 1, minute):
        store.hit(key_id=key, per_minute=9, now=window * 60.0 + 1)
    assert store.housekeep(dead_after=timedelta(minutes=1)) == 2  # the task and the answer
    with store.transaction() as tx:
        windows = set(tx.session.scalars(select(RateWindow.window)))
    assert windows <= {minute - 1, minute, minute + 1} and {minute - 1} <= windows  # this minute and the last
