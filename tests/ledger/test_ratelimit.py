"""The per-key limit per minute, counted by the database (SQLite and PostgreSQL): at its edge, one past it, per key
and per minute."""

from __future__ import annotations

from sqlalchemy import select

from helpers.ledger import Store
from sd3serve.ledger.schema import RateWindow

LIMIT = 3
MINUTE = 600 * 60  # the start of a minute, in unix seconds


def test_the_limit_is_allowed_and_one_more_is_not_per_key_and_per_minute(store: Store) -> None:
    limiter = store
    (a, _), (b, _) = store.create_key(credits=1), store.create_key(credits=1)
    hits = [limiter.hit(key_id=a.id, per_minute=LIMIT, now=MINUTE + 30) for _ in range(LIMIT + 1)]
    assert [d.allowed for d in hits] == [True, True, True, False]
    assert {d.reset_at for d in hits} == {MINUTE + 60.0}  # the end of this minute
    assert limiter.hit(key_id=b.id, per_minute=LIMIT, now=MINUTE + 30).allowed  # B counts on its own
    # The last second of the minute still counts in it; the next minute starts again at one.
    assert not limiter.hit(key_id=a.id, per_minute=LIMIT, now=MINUTE + 59.9).allowed
    nxt = limiter.hit(key_id=a.id, per_minute=LIMIT, now=MINUTE + 60)
    assert nxt.allowed and nxt.reset_at == MINUTE + 120.0
    assert [limiter.hit(key_id=a.id, per_minute=LIMIT, now=MINUTE + 61).allowed for _ in range(LIMIT)] == [
        True, True, False]  # fmt: skip


def test_without_now_the_clock_decides_the_minute(store: Store) -> None:
    import time

    limiter = store
    (a, _) = store.create_key(credits=1)
    before = time.time()
    decision = limiter.hit(key_id=a.id, per_minute=1)
    after = time.time()
    assert decision.allowed
    assert int(before // 60 + 1) * 60 <= decision.reset_at <= int(after // 60 + 1) * 60


def test_prune_drops_the_windows_before_the_one_named_and_keeps_that_one(store: Store) -> None:
    key = store.create_key(credits=1)[0].id
    minute = 60.0
    for window in (3, 4, 5):
        assert store.hit(key_id=key, per_minute=9, now=window * minute + 1).allowed
    store.prune_rate_windows(before_window=4)
    for window in (3, 4, 5):
        store.hit(key_id=key, per_minute=9, now=window * minute + 1)
    with store.transaction() as tx:
        rows = {w: c for w, c in tx.session.execute(select(RateWindow.window, RateWindow.count))}
    assert rows == {3: 1, 4: 2, 5: 2}  # window 3 was dropped and counted again from 1; 4 and 5 were kept
