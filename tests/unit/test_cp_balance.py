"""Load balance of the zigzag layout (context.py): per-rank attention work at cp 8, measured from
the gate plans (the statistics ContextParallelAttention logs as cp_work), no process group.

Shape: the 1M-token recipe's structure scaled down: 16 MoBA blocks per CP chunk and topk 12, as
1M / (2·8) = 65536 = 16 · 4096 (block 16 here, so S = 4096). A query's MoBA work is its causal
position inside its own block + 1, plus B per picked block, and it picks min(11, blocks before its
own); early chunks pick fewer, which the zigzag pairs with the latest chunks. Dense causal work
(position + 1 per query) is equal on every rank exactly: r·c + (2cp − 1 − r)·c sums to the same.
"""

from types import SimpleNamespace

import torch

from megamod.ops.moba_pieces import block_means, moba_gate_at
from megamod.parallel.context import zigzag_positions
from megamod.parallel.cp_attention import _moba_stats
from megamod.parallel.cp_comm import local_chunks

CP, B, TOPK, S, H, D = 8, 16, 12, 4096, 2, 8


def test_moba_work_is_balanced_within_5_percent_at_cp8():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(S, H, D, generator=g), torch.randn(S, H, D, generator=g)
    means = block_means(k, torch.tensor([0, S], dtype=torch.int32), B)
    c = S // (2 * CP)
    work = []
    for r in range(CP):
        starts = [ch * c for ch in local_chunks(CP, r)]
        rows = zigzag_positions(S, CP, r)
        cu = torch.tensor([0, c, 2 * c], dtype=torch.int32)
        sel = moba_gate_at(q[rows], means, cu, torch.tensor(starts), torch.zeros(2, dtype=torch.int32), B, TOPK)
        stats: dict = {}
        _moba_stats(stats, sel, starts, c, B, 1, H, SimpleNamespace(size=CP, rank=r))
        work.append(float(stats["work"]))
    mean = sum(work) / CP
    assert max(work) / mean <= 1.05, work
    assert max(work) / mean > 1.0  # rank 0's first chunk picks fewer blocks: not trivially equal
    # every rank's local chunks hold 16 blocks; the full-pick count is 11 per (query, head) once 11 are eligible
    assert max(work) == 2 * c * H * ((B + 1) / 2 + (TOPK - 1) * B)


def test_dense_causal_work_is_equal_on_every_rank():
    work = [float((zigzag_positions(S, CP, r) + 1).sum()) for r in range(CP)]
    assert max(work) / (sum(work) / CP) == 1.0
