"""Training samples from one or more .bin/.idx datasets: split, shuffled, blended, cached.

    paths, weights = parse_data_paths(["0.7", "data/a_text_document", "0.3", "data/b_text_document"])
    train, valid = build_datasets(paths, weights, seq_len=512, seed=1234, split="98,2,0",
                                  num_samples=(steps * global_batch, eval_samples))
    sampler = DistributedBatchSampler(len(train), micro_batch, dp_rank, dp_size, consumed_samples)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate)

Each dataset is split by documents (``split`` weights train,valid,test), so no document feeds both
training and validation. Sample order is in ``sample_index``; blending in ``blend``.
"""

from __future__ import annotations

import os

import numpy as np

from megamod.config import is_number
from megamod.data.blend import BlendedDataset, blend_indices
from megamod.data.indexed import IndexedDataset, strip_suffix
from megamod.data.sample_index import (FORMAT_VERSION, build_sample_index, cached_sample_index,
                                       dataset_fingerprint, epochs_needed)
from megamod.data.sampler import DistributedBatchSampler, collate

__all__ = ["GPTDataset", "EmptyDataset", "BlendedDataset", "DistributedBatchSampler", "collate",
           "parse_data_paths", "parse_split", "split_documents", "build_datasets"]

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_paths(args: list[str]) -> tuple[list[str], list[float]]:
    """``["a"]`` or ``["0.7", "a", "0.3", "b"]`` (an entry may also hold several
    whitespace-separated words, as YAML strings do) → prefixes and weights summing to 1."""
    words = [w for a in args for w in str(a).split()]
    if not words:
        raise ValueError("--data.paths is empty: give a dataset prefix, or 'W1 P1 W2 P2 ...'")
    if len(words) == 1:
        if is_number(words[0]):
            raise ValueError(f"--data.paths: {words[0]!r} is a weight without a dataset prefix")
        return [strip_suffix(words[0])], [1.0]
    if len(words) % 2:
        raise ValueError(f"--data.paths: weighted form is 'W1 P1 W2 P2 ...', got an odd number of "
                         f"words ({len(words)}): {words}")
    weights, paths = [], []
    for w, p in zip(words[::2], words[1::2]):
        if not is_number(w):
            raise ValueError(f"--data.paths: expected a weight before {p!r}, got {w!r}")
        if is_number(p):
            raise ValueError(f"--data.paths: expected a dataset prefix after weight {w}, got {p!r}")
        if not float(w) > 0 or not np.isfinite(float(w)):
            raise ValueError(f"--data.paths: weight {w} for {p!r} must be positive and finite")
        weights.append(float(w))
        paths.append(strip_suffix(p))
    total = sum(weights)
    return paths, [w / total for w in weights]


def parse_split(split: str) -> list[float]:
    """``"98,2,0"`` (or ``98/2/0``; missing parts are 0) → three shares summing to 1."""
    parts = split.replace("/", ",").split(",")
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--data.split {split!r}: expected up to three numbers like '98,2,0'") from None
    if not 1 <= len(shares) <= 3 or any(s < 0 or not np.isfinite(s) for s in shares) or sum(shares) <= 0:
        raise ValueError(f"--data.split {split!r}: expected up to three non-negative numbers with a "
                         "positive sum, like '98,2,0'")
    shares += [0.0] * (3 - len(shares))
    return [s / sum(shares) for s in shares]


def split_documents(num_docs: int, shares: list[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges for train, valid, test."""
    bounds = np.round(np.cumsum([0.0, *shares]) * num_docs).astype(np.int64)
    bounds[-1] = num_docs  # rounding must not lose the last document
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class EmptyDataset:
    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len

    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> np.ndarray:
        raise IndexError(f"sample {i} of an empty dataset")


class GPTDataset:
    """Samples of ``seq_len + 1`` tokens from one split of one indexed dataset.

    ``len()`` is at least ``num_samples`` (whole epochs are built, as in Megatron); sample i is the
    i-th in the shuffled order, so reading 0, 1, 2, ... visits samples in the seeded order."""

    def __init__(self, data: IndexedDataset, split: str, doc_range: tuple[int, int], seq_len: int,
                 num_samples: int, seed: int, cache_dir: str | None,
                 fingerprint: dict | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.data, self.split, self.seq_len = data, split, seq_len
        d0, d1 = doc_range
        s0, s1 = int(data.document_indices[d0]), int(data.document_indices[d1])
        seq_ids = np.arange(s0, s1, dtype=np.int64)
        tokens = int(data.sizes[s0:s1].sum(dtype=np.int64))
        if tokens == 0:
            raise ValueError(f"{data.prefix}: the {split} split (documents {d0}..{d1 - 1} of "
                             f"{data.num_documents}) has no tokens; change --data.split")
        epochs = epochs_needed(num_samples, seq_len, tokens)
        description = {
            "format": FORMAT_VERSION,
            "dataset": fingerprint or dataset_fingerprint(data.sizes, data.document_indices, data.dtype),
            "split": split, "documents": [d0, d1], "seq_len": seq_len, "seed": seed, "epochs": epochs,
        }
        name = f"{os.path.basename(data.prefix)}-{split}"
        self.index = cached_sample_index(
            description, cache_dir, name,
            lambda: build_sample_index(data.sizes, seq_ids, seq_len, epochs, seed, split))
        self.epochs = epochs
        self._doc_idx, self._sample_idx = self.index.doc_idx, self.index.sample_idx
        self._shuffle_idx = self.index.shuffle_idx

    def __len__(self) -> int:
        return len(self._shuffle_idx)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        j = int(self._shuffle_idx[i])
        p0, o0 = (int(x) for x in self._sample_idx[j])
        p1, o1 = (int(x) for x in self._sample_idx[j + 1])
        if p0 == p1:
            pieces = [self.data.get(int(self._doc_idx[p0]), o0, o1 - o0 + 1)]
        else:
            pieces = [self.data.get(int(self._doc_idx[p0]), o0)]
            pieces += [self.data.get(int(self._doc_idx[p])) for p in range(p0 + 1, p1)]
            pieces.append(self.data.get(int(self._doc_idx[p1]), 0, o1 + 1))
        out = np.concatenate(pieces).astype(np.int64)
        assert len(out) == self.seq_len + 1, (len(out), self.seq_len)
        return out


def default_cache_dir(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def _split_dataset(d: IndexedDataset, fingerprint: dict, split_name: str, split: str, seq_len: int,
                   count: int, seed: int, cache_dir: str | None) -> GPTDataset:
    r = split_documents(d.num_documents, parse_split(split))[SPLIT_NAMES.index(split_name)]
    if r[0] == r[1]:
        raise ValueError(f"{d.prefix}: {d.num_documents} documents leave none for the "
                         f"{split_name} split of --data.split {split!r}")
    return GPTDataset(d, split_name, r, seq_len, count, seed, cache_dir or default_cache_dir(d.prefix),
                      fingerprint)


def build_datasets(prefixes: list[str], weights: list[float], seq_len: int, seed: int, split: str,
                   num_samples: tuple[int, int], cache_dir: str | None = None):
    """(train, valid) datasets with at least ``num_samples`` samples each (exactly that many when
    blending several prefixes). Sample indices are cached in ``cache_dir``, or when that is None
    or "" (config ``data.cache_dir``'s default) in ``index-cache/`` next to each dataset."""
    if len(prefixes) != len(weights) or not prefixes:
        raise ValueError(f"--data.paths: {len(prefixes)} prefixes but {len(weights)} weights")
    if any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    shares = parse_split(split)
    data = [IndexedDataset(p) for p in prefixes]
    # Hashing the index once per dataset, not once per split (it reads every sequence length).
    fingerprints = [dataset_fingerprint(d.sizes, d.document_indices, d.dtype) for d in data]
    out = []
    for split_name, n in zip(SPLIT_NAMES[:2], num_samples):
        if n == 0:
            out.append(EmptyDataset(seq_len))
            continue
        if shares[SPLIT_NAMES.index(split_name)] == 0:
            raise ValueError(f"--data.split {split!r} gives the {split_name} split no documents, "
                             f"but {n} {split_name} samples were requested")
        if len(data) == 1:
            out.append(_split_dataset(data[0], fingerprints[0], split_name, split, seq_len, n, seed,
                                      cache_dir))
            continue
        which, within = blend_indices(weights, n)
        counts = np.bincount(which, minlength=len(data))
        out.append(BlendedDataset([
            _split_dataset(d, fp, split_name, split, seq_len, int(c), seed, cache_dir)
            for d, fp, c in zip(data, fingerprints, counts)], which, within))
    return out[0], out[1]
