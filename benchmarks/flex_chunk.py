"""The FlexAttention peer of benchmarks/moba_speed.py: MoBA-like selection at chunk level.

Each query *chunk* (not each query, as in MoBA) attends causally to its own chunk and to the
top (topk - 1) complete past chunks ranked by mean(Q_chunk) . mean(K_chunk), per head. The picks
are whole chunks for 128-query tiles, so FlexAttention's block-sparse kernel visits exactly the
tiles attended: the selection is coarser and easier than MoBA's per-token one. The gate runs
before the timed call and is not counted (as for a user who brings a block mask).

    q, k, v: (1, H, T, D);  mask = chunk_block_mask(q, k, chunk, topk)
    out = flex_attention(q, k, v, block_mask=mask)

The selection and the BlockMask live here (torch only, CPU or GPU); moba_speed.py times them. Also
here: how many 128x128 tiles such a tile-sparse kernel would visit for MoBA's per-token picks.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

TILE = 128  # FlexAttention's block (query and key tile) size; a chunk is whole tiles


def chunk_picks(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, H, T, D) -> (picked past chunks (H, nc, topk - 1), which picks are real (H, nc,
    topk - 1)): by mean(Q_c) . mean(K_j) over complete past chunks j < c, fp32, ties to the lower
    chunk. A chunk with fewer than topk - 1 past chunks has the rest marked not real."""
    _, h, t, d = q.shape
    nc = t // chunk
    qm = q[0].float().view(h, nc, chunk, d).mean(2)  # (H, nc, D)
    km = k[0].float().view(h, nc, chunk, d).mean(2)
    s = qm @ km.transpose(1, 2)  # (H, nc query chunks, nc key chunks)
    past = torch.arange(nc, device=q.device)
    s = s.masked_fill(past[None, None, :] >= past[None, :, None], float("-inf"))
    n = max(0, min(topk - 1, nc - 1))
    vals, idx = torch.sort(s, dim=-1, descending=True, stable=True)
    return idx[..., :n], vals[..., :n] > float("-inf")


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def chunk_block_mask(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int) -> BlockMask:
    """The BlockMask of chunk-level selection for q, k (1, H, T, D), T a multiple of chunk and
    chunk of TILE: per 128-query tile, the key tiles of its picked chunks and those of its own
    chunk before the diagonal are full blocks; the diagonal tile is the one partial (causal) block."""
    _, h, t, _ = q.shape
    if chunk % TILE or t % chunk:
        raise ValueError(f"chunk {chunk} must be a multiple of {TILE} and T {t} a multiple of chunk")
    per = chunk // TILE  # key tiles per chunk
    nq = t // TILE
    picks, real = chunk_picks(q, k, chunk, topk)  # (H, nc, S)
    dev = q.device
    tile = torch.arange(nq, device=dev)
    own = tile // per  # each query tile's chunk
    # full blocks: the picked chunks' tiles (unreal picks point past the end and are dropped by
    # the count), then the own chunk's tiles before the diagonal
    s = picks.shape[-1]
    pick_tiles = (picks[:, own, :, None] * per + torch.arange(per, device=dev)).flatten(2)  # (H, nq, S*per)
    pick_ok = real[:, own, :, None].expand(h, nq, s, per).flatten(2)
    before = own[:, None] * per + torch.arange(per, device=dev)  # (nq, per) own-chunk tiles
    before_ok = before < tile[:, None]
    full = torch.cat([pick_tiles, before.expand(h, nq, per)], -1)
    ok = torch.cat([pick_ok, before_ok.expand(h, nq, per)], -1)
    # real entries first, in ascending tile order (FlexAttention reads the first num_blocks)
    full = full.masked_fill(~ok, nq).sort(-1).values  # not real: index nq, sorts last
    full_num = ok.sum(-1).to(torch.int32)
    # index rows as wide as the key tiles (BlockMask's layout); the tail past num_blocks is unread
    full_idx = torch.zeros(h, nq, nq, dtype=torch.int32, device=dev)
    width = min(nq, full.shape[-1])
    full_idx[..., :width] = full[..., :width].clamp(max=nq - 1).to(torch.int32)
    part_num = torch.ones(1, h, nq, dtype=torch.int32, device=dev)
    part_idx = torch.zeros(1, h, nq, nq, dtype=torch.int32, device=dev)
    part_idx[..., 0] = tile.to(torch.int32)
    return BlockMask.from_kv_blocks(part_num, part_idx, full_num[None], full_idx[None],
                                    BLOCK_SIZE=TILE, mask_mod=_causal)


def token_mask(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int) -> torch.Tensor:
    """The same selection as a dense (H, T, T) boolean mask (tests: small T only)."""
    _, h, t, _ = q.shape
    picks, real = chunk_picks(q, k, chunk, topk)
    nc = t // chunk
    sel = torch.zeros(h, nc, nc, dtype=torch.bool, device=q.device)
    sel.scatter_(2, picks, real)
    sel |= torch.eye(nc, dtype=torch.bool, device=q.device)
    pos = torch.arange(t, device=q.device)
    blocks = sel[:, pos // chunk][:, :, pos // chunk]  # (H, T, T)
    return blocks & (pos[None, :, None] >= pos[None, None, :])


def tile_visit_fraction(T, B, topk, H=16, D=128, tile=TILE):
    """Fraction of the causal 128x128 (query, key) tiles that hold at least one picked pair
    (random inputs): a tile-sparse kernel such as FlexAttention must visit all of them."""
    from megamod.ops import moba_triton as mt  # GPU: MoBA's own per-token gate

    torch.manual_seed(2)
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    sel = mt.moba_gate_triton(q, k, cu, T, B, topk).long()  # [T, H, KS]
    nq, per = T // tile, B // tile  # key tiles per block
    own = torch.arange(T, device="cuda") // B
    visited = 0
    for h in range(H):
        hit = torch.zeros(nq, T // B, dtype=torch.bool, device="cuda")  # [query tile, block]
        s = sel[:, h, :]
        qt = (torch.arange(T, device="cuda") // tile)[:, None].expand_as(s)
        m = s >= 0
        hit[qt[m], s[m]] = True
        hit[torch.arange(nq, device="cuda"), own[::tile]] = True  # own block
        # a picked past block costs all its key tiles; the own block only those up to the diagonal
        visited += (hit.sum() - nq).item() * per + sum(min(per, (i % per) + 1) for i in range(nq))
    causal_tiles = H * nq * (nq + 1) // 2
    return visited / causal_tiles
