"""Language-model data: the embedded pydoc corpus and user files (text bytes, uint16 .bin, nanoGPT dirs)."""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from studies.tasks.base import TRAIN_FRACTION

__all__ = ["Corpus", "pydoc_text", "pydoc_corpus", "load_corpus", "check_corpus"]


@dataclass(frozen=True)
class Corpus:
    """Token arrays of a split corpus (numpy, possibly memory-mapped) and its vocabulary size."""

    train: np.ndarray
    val: np.ndarray
    vocab: int
    source: str
    chars: str | None = None   # the character vocabulary (id -> char) for the embedded corpus


@functools.lru_cache(maxsize=None)
def pydoc_text() -> str:
    """The CPython documentation topics shipped with Python, values joined in sorted key order."""
    from pydoc_data.topics import topics
    return "".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=None)
def pydoc_corpus() -> Corpus:
    """Character-level corpus of :func:`pydoc_text` (vocabulary: its sorted distinct characters)."""
    text = pydoc_text()
    chars = "".join(sorted(set(text)))
    lut = {c: i for i, c in enumerate(chars)}
    tokens = np.array([lut[c] for c in text], dtype=np.uint8 if len(chars) <= 256 else np.int64)
    n = int(len(tokens) * TRAIN_FRACTION)
    return Corpus(tokens[:n], tokens[n:], len(chars), "pydoc_data.topics (characters)", chars)


def _bin_tokens(path: str) -> np.ndarray:
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"data file is empty: {path}")
    if size % 2:
        raise ValueError(f"{path}: a .bin token file must hold uint16 tokens (even byte count), got {size} bytes")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _max_token(*arrays: np.ndarray, chunk: int = 1 << 24) -> int:
    return max(int(a[i:i + chunk].max()) for a in arrays for i in range(0, len(a), chunk))


@functools.lru_cache(maxsize=None)
def load_corpus(path: str) -> Corpus:
    """Load user data for the language-model tasks.

    - a directory holding nanoGPT's ``train.bin`` and ``val.bin`` (uint16 tokens): used as the split;
    - a file ending in ``.bin``: uint16 tokens (memory-mapped), first 90% train, last 10% validation;
    - any other file: raw bytes (byte-level, vocabulary 256), first 90% train, last 10% validation.
    For token files the vocabulary is ``max token + 1`` (one pass over the data; nanoGPT's ``meta.pkl`` is not
    read — unpickling a file is not safe). Cached per path within a process.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"data must be a path (str), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        tr, va = os.path.join(path, "train.bin"), os.path.join(path, "val.bin")
        if not (os.path.isfile(tr) and os.path.isfile(va)):
            raise ValueError(f"data directory {path} must contain train.bin and val.bin (nanoGPT layout); "
                             "or pass a text file or a single uint16 .bin token file")
        train, val = _bin_tokens(tr), _bin_tokens(va)
        return Corpus(train, val, _max_token(train, val) + 1, f"{path} (train.bin/val.bin uint16 tokens)")
    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path} (expected a text file, a uint16 .bin token file, "
                         "or a directory with train.bin and val.bin)")
    if path.endswith(".bin"):
        tokens = _bin_tokens(path)
        n = int(len(tokens) * TRAIN_FRACTION)
        return Corpus(tokens[:n], tokens[n:], _max_token(tokens) + 1, f"{path} (uint16 tokens)")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"data file is empty: {path}")
    tokens = np.frombuffer(raw, dtype=np.uint8)
    n = int(len(tokens) * TRAIN_FRACTION)
    return Corpus(tokens[:n], tokens[n:], 256, f"{path} (bytes)")


def check_corpus(corpus: Corpus, ctx: int) -> None:
    for split, arr in (("training", corpus.train), ("validation", corpus.val)):
        if len(arr) < ctx + 2:
            raise ValueError(f"{corpus.source}: the {split} split has {len(arr)} tokens, fewer than context + 2 = "
                             f"{ctx + 2}; this size needs at least {ctx + 2} tokens per split, i.e. at least "
                             f"{math.ceil((ctx + 2) / (1 - TRAIN_FRACTION))} tokens in a single file split 90/10")
