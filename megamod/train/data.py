"""The trainer's view of data: datasets for train/valid and each DP rank's micro-batches.

Every rank of a tensor/context/pipeline group must see the same samples, so the data-parallel
coordinate alone picks the slice. The sample order is a pure function of (seed, consumed
samples), which is what makes resume exact.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from megamod.config import Config


class DataError(ValueError):
    """Training data that cannot be used as configured; the message names the fix."""


class SyntheticDataset:
    """Deterministic random tokens with a learnable pattern (each sample repeats a short random
    motif), for tests and benchmarks that must not depend on a corpus."""

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, seed: int) -> None:
        self.vocab_size, self.seq_len, self.num_samples, self.seed = vocab_size, seq_len, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, i))
        motif = rng.integers(0, self.vocab_size, size=int(rng.integers(3, 12)))
        reps = (self.seq_len + 1) // len(motif) + 1
        return np.tile(motif, reps)[: self.seq_len + 1].astype(np.int64)


def build_train_valid(cfg: Config, dp_size: int):
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum * dp_size
    n_train = t.steps * global_batch
    n_valid = max(1, t.eval_steps) * t.micro_batch_size * dp_size
    if cfg.data.synthetic:
        v = cfg.model.vocab_size
        return (SyntheticDataset(v, t.seq_len, n_train, cfg.train.seed),
                SyntheticDataset(v, t.seq_len, n_valid, cfg.train.seed + 1))
    from megamod.data.gpt_dataset import build_datasets, parse_data_paths

    def build():
        try:  # the datasets' ValueErrors (IndexedDatasetError among them) name the file or flag at fault
            prefixes, weights = parse_data_paths(cfg.data.paths)
            return build_datasets(prefixes=prefixes, weights=weights, seq_len=t.seq_len, seed=t.seed,
                                  split=cfg.data.split, num_samples=(n_train, n_valid),
                                  cache_dir=cfg.data.cache_dir or None)
        except ValueError as e:
            raise DataError(str(e)) from None

    # Rank 0 builds (and caches) the sample index first; the others then read the cache.
    if dist.get_rank() == 0:
        out = build()
    dist.barrier()
    if dist.get_rank() != 0:
        out = build()
    return out


def micro_batches(dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                  consumed_samples: int, vocab_size: int | None = None) -> Iterator[torch.Tensor]:
    """Endless (B, S+1) int64 batches for this DP rank starting at ``consumed_samples`` (global).
    ``vocab_size``: token ids must lie below it (checked on the host copy, a few µs a batch:
    data tokenized with another tokenizer would otherwise fail inside the embedding, on CUDA as
    an unrecoverable device assert)."""
    from megamod.data.gpt_dataset import DistributedBatchSampler

    try:
        sampler = DistributedBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size, consumed_samples)
    except ValueError as e:
        raise DataError(str(e)) from None
    for indices in sampler:
        batch = np.stack([dataset[i] for i in indices])
        if vocab_size is not None and batch.size and (batch.max() >= vocab_size or batch.min() < 0):
            bad = int(batch.max() if batch.max() >= vocab_size else batch.min())
            raise DataError(f"token id {bad} in samples {indices[0]}..{indices[-1]} is outside --model.vocab_size "
                            f"{vocab_size}: the data was tokenized with another tokenizer; set --model.vocab_size to "
                            f"that tokenizer's, or preprocess the data with the model's tokenizer")
        yield torch.from_numpy(batch)
