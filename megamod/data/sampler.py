"""Which samples each data-parallel rank reads, resumable at any sample.

Micro-step s of the whole job reads samples [c + s·m·dp, c + (s+1)·m·dp) of the (already
shuffled) dataset, where c = ``consumed_samples`` and m the micro-batch size; rank r takes the
r-th slice of m. Concatenating every rank's batch in rank order therefore gives the same sample
sequence for any dp at a fixed global batch, and a resumed job with the right ``consumed_samples``
continues exactly at the next sample. The sampler keeps no state of its own: the trainer counts
consumed samples (a DataLoader's prefetching would make a count kept here run ahead).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class DistributedBatchSampler:
    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if not 0 <= consumed_samples <= num_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is outside the dataset's "
                             f"{num_samples} samples: was the checkpoint made with other data?")
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.dp_rank, self.dp_size, self.consumed_samples = dp_rank, dp_size, consumed_samples

    def __len__(self) -> int:
        """Micro-batches left; an incomplete last step across ranks is dropped."""
        return (self.num_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for s in range(len(self)):
            start = first + s * step
            yield list(range(start, start + self.micro_batch_size))


def collate(samples: Sequence[np.ndarray]) -> torch.Tensor:
    """[B, seq_len + 1] int64: inputs are ``x[:, :-1]``, targets ``x[:, 1:]``."""
    return torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
