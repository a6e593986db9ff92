from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import pytest

from sd3serve.errors import InsufficientCredits, InvalidApiKey, NotFound
from sd3serve.store.credits import CreditStore, digest


@pytest.fixture
def store(store_url: str) -> CreditStore:
    s = CreditStore(store_url)
    s.create_schema()
    yield s
    s.close()


def test_key_is_stored_only_as_digest(store: CreditStore) -> None:
    info, key = store.create_key(credits=5, name="alice")
    assert key.startswith("sk-") and len(key) > 40
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT digest, prefix FROM api_keys").all()
    assert rows == [(digest(key), key[:10])]
    assert store.authenticate(api_key=key).id == info.id


@pytest.mark.parametrize("bad", [None, "", "sk-nope", "x" * 500])
def test_unknown_or_missing_key_is_refused(store: CreditStore, bad: str | None) -> None:
    store.create_key(credits=1)
    with pytest.raises(InvalidApiKey):
        store.authenticate(api_key=bad)


def test_revoked_key_is_refused_and_cannot_hold(store: CreditStore) -> None:
    info, key = store.create_key(credits=5)
    store.revoke(key_id=info.id)
    with pytest.raises(InvalidApiKey):
        store.authenticate(api_key=key)
    with pytest.raises(InvalidApiKey):
        store.hold(key_id=info.id, credits=Decimal(1), request_id="r")
    assert store.list_keys()[0].revoked


def test_hold_capture_release(store: CreditStore) -> None:
    info, _ = store.create_key(credits=3)
    h1 = store.hold(key_id=info.id, credits=Decimal(2), request_id="a")
    assert store.balance(key_id=info.id) == 1
    with pytest.raises(InsufficientCredits) as e:
        store.hold(key_id=info.id, credits=Decimal(2), request_id="b")
    assert (e.value.balance, e.value.cost) == (1, 2)
    store.release(h1)
    assert store.balance(key_id=info.id) == 3
    h2 = store.hold(key_id=info.id, credits=Decimal(2), request_id="c")
    assert store.capture(h2) == 1
    # Capturing or releasing twice changes nothing.
    assert store.capture(h2) == 1
    store.release(h2)
    key = store.get_key(key_id=info.id)
    assert (key.credits, key.spent) == (1, 2)


def test_fractional_prices_add_up_exactly(store: CreditStore) -> None:
    info, _ = store.create_key(credits=1)
    for i in range(10):
        store.capture(store.hold(key_id=info.id, credits=Decimal("0.1"), request_id=f"r{i}"))
    key = store.get_key(key_id=info.id)
    assert (key.credits, key.spent) == (0, 1)


def test_add_credits_and_unknown_ids(store: CreditStore) -> None:
    info, _ = store.create_key(credits=0)
    assert store.add_credits(key_id=info.id, credits=Decimal("2.5")).credits == 2.5
    with pytest.raises(NotFound):
        store.add_credits(key_id=999, credits=1)
    with pytest.raises(NotFound):
        store.revoke(key_id=999)


def test_stale_holds_are_returned(store: CreditStore) -> None:
    info, _ = store.create_key(credits=4)
    store.hold(key_id=info.id, credits=Decimal(3), request_id="crashed")
    assert store.release_stale_holds(older_than=timedelta(hours=1)) == 0
    assert store.release_stale_holds(older_than=timedelta(seconds=-1)) == 1
    assert store.balance(key_id=info.id) == 4


def test_concurrent_holds_never_overdraw(store: CreditStore) -> None:
    info, _ = store.create_key(credits=7)
    start = threading.Barrier(24)

    def attempt(i: int) -> bool:
        start.wait()
        try:
            store.capture(store.hold(key_id=info.id, credits=Decimal(1), request_id=f"r{i}"))
            return True
        except InsufficientCredits:
            return False

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(attempt, range(24)))
    key = store.get_key(key_id=info.id)
    assert sum(results) == 7
    assert (key.credits, key.spent) == (0, 7)
