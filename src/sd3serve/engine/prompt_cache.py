"""An LRU cache of prompt embeddings, bounded by what its entries really cost and by their number: a repeated
prompt skips the encoders."""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict

import torch

TextEmbedding = tuple[torch.Tensor, torch.Tensor]  # (embeds (1, T, C), pooled (1, P))

# The objects around an entry: the tuple, two tensors with their TensorImpl and storage, the dict slot. Measured
# about 1.1 KiB an entry of two small CPU tensors (RSS over 50 000 entries); twice that for allocator slack.
ENTRY_OVERHEAD_BYTES = 2048
MAX_ENTRIES = 10_000


def entry_cost(text: str, value: TextEmbedding) -> int:
    """Bytes an entry holds: the key (a str of emoji takes 4 bytes a character), the tensors' whole storages
    (a view can keep a larger one alive) and a fixed overhead."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in value}
    return sys.getsizeof(text) + sum(storages.values()) + ENTRY_OVERHEAD_BYTES


class PromptCache:
    def __init__(self, max_bytes: int, max_entries: int = MAX_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[TextEmbedding, int]] = OrderedDict()  # text -> (value, cost)
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> TextEmbedding | None:
        with self._lock:
            item = self._items.get(text)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(text)
            self.hits += 1
            return item[0]

    def put(self, text: str, value: TextEmbedding) -> None:
        cost = entry_cost(text, value)
        if cost > self.max_bytes or self.max_entries < 1:
            return
        with self._lock:
            old = self._items.pop(text, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[text] = (value, cost)
            self._bytes += cost
            while self._bytes > self.max_bytes or len(self._items) > self.max_entries:
                _, (_, evicted_cost) = self._items.popitem(last=False)
                self._bytes -= evicted_cost

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
