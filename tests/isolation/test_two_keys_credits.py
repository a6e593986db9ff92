"""Credits are per key: adding to, holding from or revoking one key changes no other key's balance."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from helpers.ledger import open_store


def test_adding_holding_and_revoking_touch_one_key(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_schema()
    try:
        (a, _), (b, _) = store.create_key(credits=5), store.create_key(credits=5)
        assert store.add_credits(key_id=a.id, credits=3).credits == 8
        assert store.get_key(key_id=b.id).credits == 5
        held = store.reserve(key_id=a.id, credits=Decimal(2), request_id="r", owner="test")
        assert (store.balance(key_id=a.id), store.balance(key_id=b.id)) == (6, 5)
        store.revoke(key_id=b.id)
        held.capture()
        a_info, b_info = store.get_key(key_id=a.id), store.get_key(key_id=b.id)
        assert (a_info.credits, a_info.spent, a_info.revoked) == (6, 2, False)
        assert (b_info.credits, b_info.spent, b_info.revoked) == (5, 0, True)
    finally:
        store.close()
