"""Weighted interleaving of several datasets, exact and stable under extension.

Dataset d "emits" its k-th sample at time (k + ½) / w_d; the blend is all emissions in time order
(ties to the lower dataset index). After n samples dataset d has contributed round(n · w_d) of
them give or take (number of datasets)/2, at any n: the mixture is exact at every prefix, not just
on average. A longer blend starts with exactly the shorter one, so extending a run (or resuming
with more steps) never reorders samples already trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def blend_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """For each blended sample: which dataset (int16), and which sample of it (int64)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
    w = w / w.sum()
    # Dataset d's count after n samples is below n·w_d + D/2 + 1 (see the module docstring).
    per = [np.arange(int(np.ceil(num_samples * wd + len(w) / 2)) + 2) for wd in w]
    times = np.concatenate([(k + 0.5) / wd for k, wd in zip(per, w)])
    which = np.concatenate([np.full(len(k), d, dtype=np.int16) for d, k in enumerate(per)])
    within = np.concatenate(per).astype(np.int64)
    order = np.lexsort((which, times))[:num_samples]  # by time, then dataset index
    which, within = which[order], within[order]
    for d, k in enumerate(per):
        assert not (within[which == d] == k[-1]).any(), "blend ran out of emissions"
    return which, within


class BlendedDataset:
    def __init__(self, datasets: Sequence, which: np.ndarray, within: np.ndarray) -> None:
        for d, ds in enumerate(datasets):
            need = int(within[which == d].max(initial=-1)) + 1
            if len(ds) < need:
                raise ValueError(f"blended dataset {d} has {len(ds)} samples, {need} needed")
        self.datasets, self.which, self.within = list(datasets), which, within

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        return self.datasets[int(self.which[i])][int(self.within[i])]
