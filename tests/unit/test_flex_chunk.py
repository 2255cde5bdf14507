"""benchmarks/flex_chunk.py, the FlexAttention chunk-level column of moba_speed.py: its BlockMask
attends exactly the chunk-level selection (dense masked SDPA of the same picks, fp32), and the
selection is the one it describes (own chunk causal + top past chunks by mean(Q)·mean(K))."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from flex_chunk import TILE, chunk_block_mask, chunk_picks, token_mask  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

H, D = 2, 16


def _qkv(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, t, D, generator=g) for _ in range(3)]


@pytest.mark.parametrize("t,chunk,topk", [(1024, 256, 2), (1024, 128, 3), (512, 256, 4)])
def test_block_mask_attends_the_chunk_level_selection(t, chunk, topk):
    q, k, v = _qkv(t)
    mask = chunk_block_mask(q, k, chunk, topk)
    # compiled, as moba_speed.py runs it: eager flex_attention applies mask_mod alone, not the
    # block sparsity (here it would give plain causal attention)
    out = torch.compile(flex_attention)(q, k, v, block_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(q, k, chunk, topk)[None])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # the mask's tiles hold what the selection attends, and nothing else
    dense = mask.to_dense()[0].bool()  # (H, q tiles, k tiles)
    tiles = token_mask(q, k, chunk, topk).view(H, t // TILE, TILE, t // TILE, TILE).any(4).any(2)
    assert torch.equal(dense, tiles)


def test_picks_are_the_top_past_chunks_by_mean_scores():
    chunk, topk = 128, 3
    q, k, _ = _qkv(1024, seed=1)
    picks, real = chunk_picks(q, k, chunk, topk)
    qm, km = q[0].view(H, 8, chunk, D).mean(2), k[0].view(H, 8, chunk, D).mean(2)
    for h in range(H):
        for c in range(8):
            scores = {j: float(qm[h, c] @ km[h, j]) for j in range(c)}
            want = sorted(scores, key=lambda j: -scores[j])[:topk - 1]
            assert picks[h, c][real[h, c]].tolist() == want
    assert not real[:, 0].any() and real[:, 1].sum() == H  # chunk 0 has no past, chunk 1 one


def test_bad_chunk_is_refused():
    q, k, _ = _qkv(512)
    with pytest.raises(ValueError, match="multiple of 128"):
        chunk_block_mask(q, k, 96, 2)
