"""API keys are stored as SHA-256 digests, pinned to vectors computed outside Python.

The expected digests below were computed with coreutils, e.g. ``printf %s 'sk-test-key' | sha256sum``, so a
``digest()`` that changes the algorithm, the encoding or the output form is caught here, not only by tests that
compare ``digest()`` with itself.
"""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy.orm import Session

from helpers.ledger import Store
from sd3serve.errors import InvalidApiKey
from sd3serve.ledger.keys import digest
from sd3serve.ledger.schema import ApiKey

VECTORS = {
    "sk-test-key": "0d62f396c1317066f55a96086517047c737087c61eb2bf016b72e6298927b15b",
    "": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "sk-ünïcödé": "f8291eb53892401cd8966c4ca5b7d7797628915177117cec0c383507d4fb0632",  # UTF-8 bytes
}


@pytest.mark.parametrize(("key", "hexdigest"), list(VECTORS.items()))
def test_digest_is_sha256_hex_of_utf8(key: str, hexdigest: str) -> None:
    assert digest(key) == hexdigest


def test_a_key_row_written_with_a_known_digest_authenticates(store: Store) -> None:
    """A row holding only the literal digest (as an older release or another process wrote it) matches its key."""
    with Session(store.engine) as s, s.begin():
        s.add(ApiKey(name="known", digest=VECTORS["sk-test-key"], prefix="sk-test-ke", balance_micro=0, spent_micro=0))
    assert store.authenticate(api_key="sk-test-key").name == "known"
    with pytest.raises(InvalidApiKey):
        store.authenticate(api_key=VECTORS["sk-test-key"])  # the digest itself is not a key


def test_created_keys_are_stored_as_their_sha256(store: Store) -> None:
    _, key = store.create_key(credits=1, name="new")
    with store.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT digest FROM api_keys").scalar_one()
    assert stored == hashlib.sha256(key.encode()).hexdigest()  # hashlib, not the ledger's own digest()
    assert key not in stored
