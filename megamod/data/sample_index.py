"""Where each training sample's tokens live, and in what order samples are visited.

A sample is ``seq_len + 1`` consecutive tokens of the stream made by concatenating the split's
sequences, epoch after epoch, each epoch in its own seeded order. Samples start every ``seq_len``
tokens, so sample i's last token is sample i+1's first (the target of one is the input of the
next, as in Megatron) and samples run across document boundaries.

Three arrays describe it (Megatron's names and layout):
- ``doc_idx``     [E_docs · n]   sequence ids in stream order, one seeded permutation per epoch;
- ``sample_idx``  [S + 1, 2]     (position in doc_idx, token offset) of each sample's first token;
                                 row i+1 is also where sample i ends, inclusive;
- ``shuffle_idx`` [S]            visiting order: the samples starting in epoch 0, permuted, then
                                 those of epoch 1, permuted, and so on.

Everything for epoch e depends only on (seed, split, e), never on how many epochs were built, so
asking for more samples later (a longer run, a resume) appends to the order without changing
the part already trained on. Permuting within epochs, not across them, means every sequence is
visited once before any is visited twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the arrays' meaning changes: old caches then no longer match
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


@dataclass
class SampleIndex:
    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray
    cache_hit: bool = False
    cache_prefix: str | None = None


def epochs_needed(num_samples: int, seq_len: int, tokens_per_epoch: int) -> int:
    """Epochs E whose samples (those starting in epochs [0, E)) number at least num_samples."""
    # Samples starting in [0, E·T) number ceil(E·T / seq_len).
    return max(1, -(-num_samples * seq_len // tokens_per_epoch))


def build_sample_index(sizes: np.ndarray, seq_ids: np.ndarray, seq_len: int, epochs: int,
                       seed: int, split: str) -> SampleIndex:
    """``sizes`` are all sequence lengths of the dataset; ``seq_ids`` the split's sequences."""
    tokens_per_epoch = int(sizes[seq_ids].sum(dtype=np.int64))
    if tokens_per_epoch <= 0:
        raise ValueError("no tokens to sample from")
    code = SPLIT_CODES[split]
    n_starting = -(-epochs * tokens_per_epoch // seq_len)  # samples that start in epochs [0, E)
    # Enough further epochs that the last of those samples is complete (seq_len + 1 tokens).
    doc_epochs = epochs + 1 + seq_len // tokens_per_epoch
    id_dtype = np.int32 if len(sizes) < 2**31 else np.int64
    doc_idx = np.concatenate([
        np.random.default_rng([seed, code, e]).permutation(seq_ids).astype(id_dtype)
        for e in range(doc_epochs)])

    cum = np.zeros(len(doc_idx) + 1, dtype=np.int64)
    np.cumsum(sizes[doc_idx], out=cum[1:])
    starts = np.arange(n_starting + 1, dtype=np.int64) * seq_len
    assert starts[-1] < cum[-1]
    # side="right": a start at a boundary belongs to the next non-empty sequence, never to an
    # empty one, and every offset is inside its sequence.
    pos = np.searchsorted(cum, starts, side="right") - 1
    sample_idx = np.stack([pos, starts - cum[pos]], axis=1)

    epoch_of = starts[:-1] // tokens_per_epoch
    bounds = np.searchsorted(epoch_of, np.arange(epochs + 1))
    shuffle_idx = np.concatenate([
        lo + np.random.default_rng([seed, code, e, 1]).permutation(hi - lo)
        for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]).astype(np.int64)
    return SampleIndex(doc_idx, sample_idx, shuffle_idx)


def dataset_fingerprint(sizes: np.ndarray, document_indices: np.ndarray, dtype: np.dtype) -> dict:
    """Identifies the data, not its path: a copied or moved dataset still hits the cache, a
    re-tokenized one does not."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(sizes).tobytes())
    h.update(np.ascontiguousarray(document_indices).tobytes())
    return {"sequences": int(len(sizes)), "documents": int(len(document_indices) - 1),
            "tokens": int(sizes.sum(dtype=np.int64)), "dtype": str(dtype), "blake2b": h.hexdigest()}


_ARRAYS = ("doc_idx", "sample_idx", "shuffle_idx")


def cached_sample_index(description: dict, cache_dir: str | None, name: str,
                        build) -> SampleIndex:
    """Load the index described by ``description`` from ``cache_dir``, or ``build()`` it and save it.

    Files are ``{name}-{hash}-{array}.npy`` plus ``{name}-{hash}.json`` holding the description;
    the hash is of the description, so different inputs never share files. The .json is written
    last, and each file via a temporary name, so a present .json means complete arrays (ranks
    racing to write write identical bytes).
    """
    if cache_dir is None:
        return build()
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    prefix = os.path.join(cache_dir, f"{name}-{key}")
    loaded = _load(prefix, description)
    if loaded is not None:
        return loaded
    index = build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for a in _ARRAYS:
            _atomic_write(f"{prefix}-{a}.npy", lambda f, a=a: np.save(f, getattr(index, a)))
        _atomic_write(prefix + ".json", lambda f: f.write(
            json.dumps(description, sort_keys=True, indent=1).encode()))
        index.cache_prefix = prefix
    except OSError as e:  # read-only data directory: train anyway, just rebuild next time
        logger.warning("could not cache the sample index in %s (%s); set data.cache_dir", cache_dir, e)
    return index


def _load(prefix: str, description: dict) -> SampleIndex | None:
    try:
        with open(prefix + ".json", encoding="utf-8") as f:
            if json.load(f) != description:
                return None
        arrays = {a: np.load(f"{prefix}-{a}.npy", mmap_mode="r") for a in _ARRAYS}
    except (OSError, ValueError):
        return None
    n = len(arrays["shuffle_idx"])
    if arrays["sample_idx"].shape != (n + 1, 2):
        logger.warning("sample index cache %s is inconsistent; rebuilding", prefix)
        return None
    return SampleIndex(**arrays, cache_hit=True, cache_prefix=prefix)


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
