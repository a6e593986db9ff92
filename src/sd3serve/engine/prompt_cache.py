"""An LRU cache of prompt embeddings, bounded by the bytes it holds: a repeated prompt skips the encoders."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

TextEmbedding = tuple[torch.Tensor, torch.Tensor]  # (embeds (1, T, C), pooled (1, P))


def _nbytes(value: TextEmbedding) -> int:
    return sum(t.numel() * t.element_size() for t in value)


class PromptCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, TextEmbedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> TextEmbedding | None:
        with self._lock:
            value = self._items.get(text)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(text)
            self.hits += 1
            return value

    def put(self, text: str, value: TextEmbedding) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(text, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._items[text] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= _nbytes(evicted)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
