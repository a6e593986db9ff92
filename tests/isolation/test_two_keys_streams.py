"""Stream slots are counted per API key: one key at its limit is refused (429) while another key opens its own, and
closing one key's streams frees only that key's slots."""

from __future__ import annotations

import pytest

from sd3serve.errors import Overloaded, TooManyStreams
from sd3serve.service.streams import StreamHub


def test_a_key_at_its_limit_leaves_another_key_its_slots() -> None:
    hub = StreamHub(None, per_key=2, total=5)  # type: ignore[arg-type]  (slots never read the ledger)
    a = [hub.open(1), hub.open(1)]
    with pytest.raises(TooManyStreams):
        hub.open(1)  # one past the key's limit
    b = [hub.open(2), hub.open(2)]  # the other key gets all of its own
    assert (hub.held(1), hub.held(2), hub.held()) == (2, 2, 4)
    a[0].release()
    a[0].release()  # idempotent: frees one slot, once
    assert (hub.held(1), hub.held(2)) == (1, 2)
    with pytest.raises(TooManyStreams):
        hub.open(2)  # A's freed slot is not B's
    a.append(hub.open(1))
    for slot in a + b:
        slot.release()
    assert hub.held() == 0


def test_the_process_limit_is_shared_but_counted_at_its_edge() -> None:
    hub = StreamHub(None, per_key=3, total=4)  # type: ignore[arg-type]
    held = [hub.open(1), hub.open(1), hub.open(1), hub.open(2)]  # exactly the process limit
    with pytest.raises(Overloaded):
        hub.open(3)
    held.pop().release()
    held.append(hub.open(3))  # a freed slot goes to whoever asks next
    assert (hub.held(1), hub.held(2), hub.held(3)) == (3, 0, 1)
