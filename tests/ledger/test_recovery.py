"""Settling a dead process (ledger/recovery.py): a synchronous request's hold alone is returned, another process's
hold is not, and an owner whose heartbeat is at or after the cutoff when the settling transaction looks again is
left alone (it beat between the first look and the transaction)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from helpers.ledger import Store, sharing
from sd3serve.ledger.schema import Instance


def _beat_at(store: Store, instance_id: str, at: datetime) -> None:
    with Session(store.engine) as s, s.begin():
        s.execute(update(Instance).where(Instance.id == instance_id).values(heartbeat_at=at))


def test_a_dead_process_with_only_a_synchronous_hold_gets_it_returned(store: Store) -> None:
    """B dies holding credits for a v1 request (no task); C, alive, holds credits of another key."""
    a, b, c = sharing(store), sharing(store), sharing(store)
    for r in (a, b, c):
        r.register()
    kb, kc = store.create_key(credits=5)[0].id, store.create_key(credits=5)[0].id
    store.reserve(key_id=kb, credits=Decimal(2), request_id="v1-b", owner=b.instance_id)
    store.reserve(key_id=kc, credits=Decimal(3), request_id="v1-c", owner=c.instance_id)
    _beat_at(store, b.instance_id, datetime.now(UTC) - timedelta(minutes=5))
    assert a.settle_dead(dead_after=timedelta(seconds=30)) == 1
    assert store.balance(key_id=kb) == 5  # B's hold returned
    assert store.balance(key_id=kc) == 2  # C's still held
    assert c.heartbeat() is True and b.heartbeat() is False


@pytest.mark.parametrize("beat", [timedelta(0), timedelta(seconds=1)], ids=["at the cutoff", "after it"])
def test_an_owner_that_beat_since_the_first_look_is_left_alone(store: Store, beat: timedelta) -> None:
    a, b = sharing(store), sharing(store)
    a.register()
    b.register()
    key = store.create_key(credits=5)[0].id
    store.reserve(key_id=key, credits=Decimal(2), request_id="v1-b", owner=b.instance_id)
    cutoff = datetime.now(UTC) - timedelta(seconds=30)
    _beat_at(store, b.instance_id, cutoff + beat)
    a.settle(b.instance_id, cutoff=cutoff)  # the transaction's own look: B is alive
    assert store.balance(key_id=key) == 3
    assert b.heartbeat() is True  # B's row is still there
    # Once its heartbeat is older than the cutoff, it is settled.
    _beat_at(store, b.instance_id, cutoff - timedelta(seconds=1))
    a.settle(b.instance_id, cutoff=cutoff)
    assert store.balance(key_id=key) == 5
    assert b.heartbeat() is False
