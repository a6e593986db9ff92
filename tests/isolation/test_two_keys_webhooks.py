"""Webhooks are per API key: each key signs with its own secret, one key's backlog never hides another key's
deliveries, and what is done to one key's deliveries (retry, give-up) leaves the other's as they were."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from helpers.ledger import Store, open_store
from sd3serve.ledger.schema import WebhookDelivery
from sd3serve.ledger.webhooks import PENDING

START = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}", clock=lambda: START)
    s.create_schema()
    yield s
    s.close()


def _pending(store: Store, key_id: int, n: int, *, tag: str) -> list[str]:
    """``n`` deliveries of the key, due now, each for a task of its own."""
    ids = [f"msg_{tag}_{i}" for i in range(n)]
    with store.db.transaction() as tx:
        tx.session.add_all(
            WebhookDelivery(id=msg, key_id=key_id, task_id=f"task_{msg}", url=f"http://{tag}.example/hook",
                            payload=json.dumps({"data": {"request_id": f"task_{msg}"}}), status=PENDING,
                            next_attempt_at=START - timedelta(seconds=i), created_at=START)
            for i, msg in enumerate(ids)
        )
    return ids


def test_each_key_signs_with_its_own_secret(store: Store) -> None:
    (a, _), (b, _) = store.create_key(credits=1), store.create_key(credits=1)
    secret_b = store.rotate_secret(key_id=b.id)
    store.rotate_secret(key_id=a.id)
    store.rotate_secret(key_id=a.id)  # A rotating again leaves B's secret as it was
    _pending(store, a.id, 1, tag="a")
    _pending(store, b.id, 1, tag="b")
    leased = store.lease([d.id for d in store.due(limit=10, per_key=10)], owner="p", seconds=60)
    by_key = {d.key_id: d.secret for d in leased}
    assert by_key[b.id] == secret_b and by_key[a.id] not in ("", secret_b)


def test_one_keys_backlog_never_hides_another_keys_delivery(store: Store) -> None:
    (a, _), (b, _) = store.create_key(credits=1), store.create_key(credits=1)
    _pending(store, a.id, 20, tag="a")  # older than B's: first in line
    (late,) = _pending(store, b.id, 1, tag="b")
    due = store.due(limit=5, per_key=4)
    assert [d.key_id for d in due].count(a.id) == 4  # the per-key share, at its edge
    assert late in [d.id for d in due]
    assert [d.id for d in store.due(limit=5, per_key=4, skip_keys=[a.id])] == [late]  # A full: B still served


def test_retrying_one_keys_task_leaves_the_other_keys_deliveries(store: Store) -> None:
    (a, _), (b, _) = store.create_key(credits=1), store.create_key(credits=1)
    (msg_a,) = _pending(store, a.id, 1, tag="a")
    (msg_b,) = _pending(store, b.id, 1, tag="b")
    for d in store.lease([msg_a, msg_b], owner="p", seconds=60):
        store.record(d, status_code=500, error=None, duration_ms=1.0)  # both failed once: due again later
    assert store.due(limit=10, per_key=10) == []
    store.retry_now(task_id=f"task_{msg_a}")
    assert [d.id for d in store.due(limit=10, per_key=10)] == [msg_a]
    assert store.deliveries(task_id=f"task_{msg_b}") == [(msg_b, PENDING, 1)]
