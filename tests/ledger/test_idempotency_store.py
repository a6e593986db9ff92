"""Idempotency keys on SQLite and PostgreSQL: one claim wins among concurrent duplicates; the answer is written
with the charge; a failed request gives its claim back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

from helpers.ledger import Store, answered, open_store, sharing
from sd3serve.errors import IdempotencyConflict, IdempotencyInProgress
from sd3serve.ledger.idempotency import Claim, fingerprint


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[Store, Store]]:
    """Two processes' ledgers on one database: one charges, the other claims keys."""
    credits = open_store(store_url)
    credits.create_schema()
    yield credits, sharing(credits)
    credits.close()


def test_concurrent_duplicates_claim_once(stores: tuple[Store, Store]) -> None:
    credits, idem = stores
    key_id = credits.create_key(credits=5)[0].id
    body = fingerprint("v1", '{"prompt": "a red circle"}')
    start = threading.Barrier(12)

    def attempt(_: int) -> str:
        start.wait()
        try:
            return "claimed" if idem.begin(key_id=key_id, idem_key="k", fingerprint=body) is None else "answer"
        except IdempotencyInProgress:
            return "in progress"

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(attempt, range(12)))
    assert outcomes.count("claimed") == 1 and outcomes.count("in progress") == 11

    # The winner is charged and answered in one transaction; retries then get that answer.
    reservation = credits.reserve(key_id=key_id, credits=Decimal(1), request_id="r", owner="me")
    reservation.capture(deliver=answered(Claim(key_id, "k"), b"the first answer"))
    assert idem.begin(key_id=key_id, idem_key="k", fingerprint=body) == b"the first answer"
    with pytest.raises(IdempotencyConflict):
        idem.begin(key_id=key_id, idem_key="k", fingerprint=fingerprint("v1", '{"prompt": "a blue square"}'))
    assert credits.get_key(key_id=key_id).spent == 1


def test_a_failed_request_gives_its_claim_back(stores: tuple[Store, Store]) -> None:
    credits, idem = stores
    key_id = credits.create_key(credits=5)[0].id
    body = fingerprint("v2", "{}")
    assert idem.begin(key_id=key_id, idem_key="k", fingerprint=body) is None
    idem.abandon(Claim(key_id, "k"))
    assert idem.begin(key_id=key_id, idem_key="k", fingerprint=body) is None  # the retry runs
    other = credits.create_key(credits=5)[0].id
    assert idem.begin(key_id=other, idem_key="k", fingerprint=body) is None  # keys are per API key
