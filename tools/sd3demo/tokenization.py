"""The tokenizers of every model built here, made locally so that nothing is downloaded.

Both tokenize any text by characters, and make each of ``words`` (if any) a single token: the demo model passes
its world's vocabulary (``world.VOCABULARY``) and 16-token windows, the tiny test model and the benchmarks'
random-weight SD3.5 pass no words and keep SD3's windows.

(Not ``tokenizers.py``: run as a script from this folder, it would shadow Hugging Face's ``tokenizers``.)
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Sequence

from transformers import CLIPTokenizer, T5TokenizerFast

CLIP_CHARS = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
T5_CHARS = sorted(set(string.ascii_lowercase + string.digits))


def _bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges learnt on ``words`` until each is a single token (ties broken by name)."""
    segs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in segs.values():
            for pair in itertools.pairwise(s):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        pair = max(sorted(counts), key=lambda p: counts[p])
        merges.append(pair)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out


def build_clip_tokenizer(words: Sequence[str] = (), max_length: int = 77) -> CLIPTokenizer:
    """Characters, word-final or not (so any text tokenizes), plus merges that make each of ``words`` one token."""
    tokens = ["<|startoftext|>", "<|endoftext|>", *CLIP_CHARS, *(c + "</w>" for c in CLIP_CHARS)]
    merges = _bpe_merges(words)
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=max_length)


def build_t5_tokenizer(words: Sequence[str] = (), max_length: int = 512) -> T5TokenizerFast:
    """A unigram vocabulary of characters (low score) and ``words`` (high score)."""
    pieces = ["<pad>", "</s>", "<unk>", "▁", *T5_CHARS]
    vocab = [(p, 0.0 if i < 3 else -10.0) for i, p in enumerate(pieces)]
    vocab += [("▁" + w, -1.0) for w in words]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)
