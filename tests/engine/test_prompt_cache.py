"""The prompt-embedding cache: LRU, bounded by what entries really cost and by their number."""

from __future__ import annotations

import sys

import torch

from sd3serve.engine.prompt_cache import ENTRY_OVERHEAD_BYTES, PromptCache, entry_cost


def emb() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, 10, 10), torch.zeros(1, 10)  # 440 bytes of tensors


def test_lru_order_and_byte_bound() -> None:
    cost = entry_cost("a", emb())
    assert cost == sys.getsizeof("a") + 440 + ENTRY_OVERHEAD_BYTES
    cache = PromptCache(max_bytes=2 * cost + cost // 2)
    for text in ("a", "b", "c"):
        cache.put(text, emb())
    assert len(cache) == 2 and cache.nbytes == 2 * cost
    assert cache.get("a") is None and cache.get("c") is not None
    cache.get("b")
    cache.put("d", emb())  # evicts the least recently used: c
    assert cache.get("c") is None and cache.get("b") is not None
    cache.put("huge", (torch.zeros(100_000), torch.zeros(1)))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and len(cache) == 2
    cache.put("b", emb())  # replacing an entry counts it once
    assert cache.nbytes == 2 * cost


def test_long_prompts_count_their_keys() -> None:
    """A 10 000-emoji prompt is a 40 KB key: the budget holds the keys too, not only the tensors."""
    prompt = "🐼" * 10_000
    assert entry_cost(prompt, emb()) > 40_000
    cache = PromptCache(max_bytes=1_000_000)
    for i in range(100):
        cache.put(f"{i} {prompt}", emb())
    assert cache.nbytes <= 1_000_000 and len(cache) == 1_000_000 // entry_cost(f"10 {prompt}", emb())
    held = sum(sys.getsizeof(text) + 440 for text in cache._items)
    assert held <= cache.nbytes  # what the entries really hold is inside the budget


def test_views_count_their_whole_storage() -> None:
    batch = torch.zeros(8, 10, 10)
    view = (batch[:1], torch.zeros(1, 10))  # keeps all 8 rows alive
    assert entry_cost("a", view) == sys.getsizeof("a") + batch.nbytes + 40 + ENTRY_OVERHEAD_BYTES


def test_bounded_by_entries() -> None:
    cache = PromptCache(max_bytes=10**9, max_entries=3)
    for i in range(10):
        cache.put(str(i), emb())
    assert len(cache) == 3 and [cache.get(str(i)) is not None for i in (6, 7, 8, 9)] == [False, True, True, True]
    assert cache.nbytes == sum(entry_cost(str(i), emb()) for i in (7, 8, 9))


def test_zero_budget_keeps_nothing() -> None:
    cache = PromptCache(max_bytes=0)
    cache.put("a", emb())
    assert len(cache) == 0 and cache.nbytes == 0
