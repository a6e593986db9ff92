from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

from helpers.ledger import Store, open_store
from sd3serve.errors import InsufficientCredits, InvalidApiKey, NotFound, ReservationLost
from sd3serve.ledger.keys import digest


@pytest.fixture
def store(store_url: str) -> Store:
    s = open_store(store_url)
    s.create_schema()
    yield s
    s.close()


def test_key_is_stored_only_as_digest(store: Store) -> None:
    info, key = store.create_key(credits=5, name="alice")
    assert key.startswith("sk-") and len(key) > 40
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT digest, prefix FROM api_keys").all()
    assert rows == [(digest(key), key[:10])]
    assert store.authenticate(api_key=key).id == info.id


@pytest.mark.parametrize("bad", [None, "", "sk-nope", "x" * 500])
def test_unknown_or_missing_key_is_refused(store: Store, bad: str | None) -> None:
    store.create_key(credits=1)
    with pytest.raises(InvalidApiKey):
        store.authenticate(api_key=bad)


def test_revoked_key_is_refused_and_cannot_hold(store: Store) -> None:
    info, key = store.create_key(credits=5)
    store.revoke(key_id=info.id)
    with pytest.raises(InvalidApiKey):
        store.authenticate(api_key=key)
    with pytest.raises(InvalidApiKey):
        store.hold(key_id=info.id, credits=Decimal(1), request_id="r")
    assert store.list_keys()[0].revoked


def test_hold_capture_release(store: Store) -> None:
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
    # A hold is settled once: capturing again is refused (nothing delivered twice), releasing changes nothing.
    with pytest.raises(ReservationLost):
        store.capture(h2)
    store.release(h2)
    key = store.get_key(key_id=info.id)
    assert (key.credits, key.spent) == (1, 2)


def test_fractional_prices_add_up_exactly(store: Store) -> None:
    info, _ = store.create_key(credits=1)
    for i in range(10):
        store.capture(store.hold(key_id=info.id, credits=Decimal("0.1"), request_id=f"r{i}"))
    key = store.get_key(key_id=info.id)
    assert (key.credits, key.spent) == (0, 1)


def test_add_credits_and_unknown_ids(store: Store) -> None:
    info, _ = store.create_key(credits=0)
    assert store.add_credits(key_id=info.id, credits=Decimal("2.5")).credits == 2.5
    with pytest.raises(NotFound):
        store.add_credits(key_id=999, credits=1)
    with pytest.raises(NotFound):
        store.revoke(key_id=999)


def test_reservation_captures_once_or_refunds_on_close(store: Store) -> None:
    info, _ = store.create_key(credits=5)
    r = store.reserve(key_id=info.id, credits=Decimal(2), request_id="a", owner="me")
    assert (r.credits, store.balance(key_id=info.id)) == (2, 3)
    assert r.capture() == 3
    r.close()  # after a capture: nothing to return
    assert (store.get_key(key_id=info.id).credits, store.get_key(key_id=info.id).spent) == (3, 2)

    failed = store.reserve(key_id=info.id, credits=Decimal(1), request_id="b", owner="me")
    failed.close()
    failed.close()  # idempotent
    assert store.balance(key_id=info.id) == 3

    def boom(_s: object, _h: object) -> None:
        raise RuntimeError("the delivery failed")

    undelivered = store.reserve(key_id=info.id, credits=Decimal(1), request_id="c", owner="me")
    with pytest.raises(RuntimeError):
        undelivered.capture(deliver=boom)  # the charge rolls back with the delivery
    assert store.get_key(key_id=info.id).spent == 2
    undelivered.close()
    assert store.balance(key_id=info.id) == 3


def test_capture_after_the_hold_was_returned_delivers_nothing(store: Store) -> None:
    """Another process presumed this one dead and returned its hold: the late capture must not charge or deliver."""
    info, _ = store.create_key(credits=5)
    r = store.reserve(key_id=info.id, credits=Decimal(2), request_id="a", owner="me")
    store.release(r.hold)  # what recovery does for a dead owner
    delivered: list[bool] = []
    with pytest.raises(ReservationLost):
        r.capture(deliver=lambda _s, _h: delivered.append(True))
    assert delivered == []
    key = store.get_key(key_id=info.id)
    assert (key.credits, key.spent) == (5, 0)


def test_concurrent_holds_never_overdraw(store: Store) -> None:
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


def test_balances_stay_64_bit_integers_and_micro_credit_exact(store: Store) -> None:
    from sd3serve.errors import InvalidRequest
    from sd3serve.ledger.credits import MAX_BALANCE

    info, _ = store.create_key(credits=MAX_BALANCE - 1)
    assert store.add_credits(key_id=info.id, credits=1).credits == float(MAX_BALANCE)
    with pytest.raises(InvalidRequest, match="would exceed"):
        store.add_credits(key_id=info.id, credits=Decimal("0.000001"))
    assert store.get_key(key_id=info.id).credits == float(MAX_BALANCE)  # unchanged, still an integer column
    with pytest.raises(InvalidRequest, match=r"steps of 0\.000001"):
        store.add_credits(key_id=info.id, credits=Decimal("1e-7"))  # would round to 0 without a word
