"""MoBA attention on the GPU: Triton kernels (semantics and notation: megamod/ops/moba.py).

Why this shape. MoBA picks blocks per query token, so the queries of a 128-row tile pick
nearly every past block between them (random data: almost all); a query-tile kernel (and
FlexAttention, which skips work only per 128x128 tile) then does almost dense work. Here the
work is grouped the other way round, by the block that was picked (steps 0-3, the plan, in
megamod/ops/moba_plan.py; 4 here; 5 in megamod/ops/moba_backward.py):

  0. plan kernels         _blocks_kernel: global block table of the packed batch
  1. _block_mean_kernel   mean of K per block                          [NB, Hkv, D] fp32
  2. _gate_kernel         per query tile: fp32 scores against the block means of its
                          sequence (exact CUDA-core fp32, tf32x3 tensor-core products, or for
                          bf16 inputs three exact bf16 products against the means split in bf16
                          parts: see GPU_CFG), running top-KS with the lower-index tie rule;
                          writes only the sort key of each (query, head, slot) entry [T, H, KS]
                          int32 (no [NB, H, T] score tensor). A row with p < KS picks holds them
                          in its last p slots.
  3. plan                 stable torch.sort of the keys by segment (head, block, slot): each
                          segment is a contiguous list of tokens, the slots of one (head, block)
                          are adjacent; _entries_kernel (tokens, segment bounds) and the tile
                          schedule kernels. No host synchronisation.
  4. forward              the own-block pass first (causal flash attention inside each block;
                          it needs no plan, so it runs while the host launches steps 1-3): the
                          final output of rows without picks, the running fp32 state (o, lse) of
                          the others. Then one pass per slot s, 0 .. KS-1: a program takes <= BM
                          gathered queries of one segment, streams that block's B keys, and
                          merges into the state of its rows; pass KS-1, which every row with a
                          pick is in, writes the output in the input dtype. In one pass a query
                          occurs in one segment only, so the read-modify-write needs no atomics.
  5. backward             exact; dQ in the same order: the own block first (which also computes
                          delta = rowsum(dO * O) - dlse), then the slot passes 0 .. KS-1 into the
                          fp32 rows, the last writing dq; dK/dV per (block, key tile, kv head):
                          own-block queries, then every segment that picked the block, for each
                          query head of the GQA group (on Hopper in Gluon: moba_gluon.py). No
                          atomics anywhere, so results are deterministic.
Memory is linear in T: picks and the sorted entry list are T*H*KS int32, fp32 accumulators
T*H*D. Everything is computed in base 2 (exp2) with log2(e) folded into the scale.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megamod.ops.moba_backward import _backward
from megamod.ops.moba_plan import (LOG2E, _cdiv, _gate, _kv_descriptors, _plan_blocks, _plan_picks, _prec,
                                   _query_tile, _slot_tile, _store_own, _tiles)

LN2 = 0.6931471805599453

# Tile configs (BM query rows, BN key rows), measured on an H100 (benchmarks/experiments/NOTES_moba.md).
# Long blocks favour the larger forward tile; the gate uses split-fp32 tensor-core products
# ("tf32x3", ~1e-6 relative): the exact-fp32 CUDA-core variant ("fma") is 9x slower there.
# gate_stages=1: the tf32x3 gate keeps q and its split in shared memory (98 KB at 1 stage, 131 KB
# at 3), so one stage lets two programs share an SM: gate+plan 3.40 -> 2.65 ms at 128K (sweep
# 12:48 UTC); long blocks keep the 3 stages their end-to-end numbers were measured with.
# Gate "bf16split" for bf16 inputs (q exact in bf16, block means split in three bf16 parts, so three
# exact bf16 products instead of tf32x3's per-chunk split of q; fp32 inputs fall back to tf32x3):
# 128K/512 gate+plan 2.63 -> 1.52 ms, 32K 0.47 -> 0.39 ms, picks equal to torch fp32's (14:58 UTC).
# dK/dV (session 3): 64 queries x 128 keys, 8 warps, 3 stages at every chunk size, after its loop
# lost its per-element masks and 64-bit offsets (moba_backward._kv_inner): backward 822.7 -> 681.2 ms
# at 256K/4096 and 16.59 -> 15.06 ms at 128K/512 (sweep 15:29 UTC); fp32 inputs keep the old tile
# (shared memory).
# Slot passes (forward, dQ) stream their block's K/V tiles by TMA (session 4, 17:55 UTC): forward
# -3% at 256K/4096 (219.0 -> 212.1 ms), -4% at 128K/512 (5.68 -> 5.45 ms); dQ backward -1%.
# kv_impl "gluon": dK/dV by moba_gluon's kernel where it applies (Hopper, bf16, head dim 64 or 128; the
# kv_* tiles above are the Triton kernel's, used elsewhere): 1.25-1.36x faster (session 5).
GPU_CFG = dict(
    fwd_bm=64, fwd_bn=64, fwd_warps=4, fwd_stages=3, fwd_tma=1,
    dq_bm=128, dq_bn=64, dq_warps=8, dq_stages=3, dq_tma=1,
    kv_bm=64, kv_bn=128, kv_warps=8, kv_stages=3, kv_impl="gluon",
    gate_bm=64, gate_nblk=64, gate_dc=4, gate_warps=4, gate_prec="bf16split", gate_stages=2,
)
# Long blocks (session 4 gate sweep at 1M/4096/12, gate+plan): bf16split 35.1 ms at 32 blocks per
# chunk and 1 stage (2 stages, 64 blocks: 36.7), tf32x3 48.5 (1 stage) / 75.9 ms (3 stages, before).
GPU_CFG_LONG_BLOCKS = dict(fwd_bm=128, fwd_bn=64, fwd_warps=8, fwd_stages=3,  # chunk >= 2048
                           gate_nblk=32, gate_stages=1)
INTERP_CFG = dict(  # TMA on: the test cases whose chunk is a multiple of 16 and D a power of 2 take it
    fwd_bm=16, fwd_bn=16, fwd_warps=4, fwd_stages=1, fwd_tma=1,
    dq_bm=16, dq_bn=16, dq_warps=4, dq_stages=1, dq_tma=1,
    kv_bm=16, kv_bn=16, kv_warps=4, kv_stages=1, kv_impl="triton",  # Gluon has no interpreter
    gate_bm=16, gate_nblk=16, gate_dc=8, gate_warps=4, gate_prec="fma",
)


# The kernels take max_seqlen for their grids: it must be >= the longest sequence (as in
# flash-attn's varlen API); tokens past it would be left unwritten.

# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, Kb, Vb, n_lo, n_hi, pos, stride_kt, offs_d, D, qk_scale,
               BN: tl.constexpr, CAUSAL: tl.constexpr, SAME_BLOCK: tl.constexpr, CHUNK: tl.constexpr,
               KMASK: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of q against the keys [n_lo, n_hi) counted from the base pointers Kb, Vb
    (int32 offsets: callers put the base at a block start). pos: query positions, same origin."""
    for n0 in range(n_lo, n_hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        kmask = offs_d[None, :] < D
        if KMASK:
            kmask = kmask & (offs_n[:, None] < n_hi)
        kp = offs_n[:, None] * stride_kt + offs_d[None, :]  # int32: inside one block's span
        k = tl.load(Kb + kp, mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BM, BN]
        if CAUSAL:
            vis = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] < n_hi)
            if SAME_BLOCK:
                vis = vis & ((offs_n[None, :] // CHUNK) == (pos[:, None] // CHUNK))
            s = tl.where(vis, s, float("-inf"))
        elif KMASK:
            s = tl.where(offs_n[None, :] < n_hi, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Vb + kp, mask=kmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_inner_tma(acc, m_i, l_i, q, desc_k, desc_v, row0, col, qk_scale, BN: tl.constexpr, CHUNK: tl.constexpr,
                   PREC: tl.constexpr):
    """_fwd_inner over a whole (picked, so complete) block whose K/V tiles come by TMA: rows
    row0 .. row0 + CHUNK - 1 of the [T, Hkv * D] views, columns col .. col + D - 1 (no masks)."""
    for n0 in range(0, CHUNK, BN):
        k = desc_k.load([row0 + n0, col])
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BM, BN]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([row0 + n0, col])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_own_kernel(Q, K, V, O32, OUT, LSE, CU, qk_scale, stride_qt, stride_qh, stride_kt, stride_kh,
                    stride_ot, stride_oh, stride_lt, G, D, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, ALIGNED: tl.constexpr, HAS_PAST: tl.constexpr,
                    PREC: tl.constexpr):
    """Causal attention inside the own block, run first (it needs no plan, so the GPU has work
    while the host launches the plan): writes (o, lse2). HAS_PAST: the rows with picks (position
    >= CHUNK) get o in fp32 into O32, the running state the slot passes merge into; the others
    (and every row without HAS_PAST) get their final output in OUT's dtype (O32 and OUT share
    strides; they may be the same tensor)."""
    n, h, s0, L, m0, pos, rows = _query_tile(CU, BM)
    if m0 >= L:
        return
    offs_d = tl.arange(0, BLOCK_D)
    qmask = (pos[:, None] < L) & (offs_d[None, :] < D)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    # origin of the key axis: the start of the first row's block (int32 offsets from there)
    blk_lo = (m0 // CHUNK) * CHUNK
    kv_base = (s0 + blk_lo).to(tl.int64) * stride_kt + (h // G) * stride_kh
    Kb = K + kv_base
    Vb = V + kv_base
    rel = pos - blk_lo
    hi = tl.minimum(L, m0 + BM) - blk_lo
    if ALIGNED:  # BM | CHUNK and BN | BM: the tile lies in one block; mask only the diagonal
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, Kb, Vb, 0, m0 - blk_lo, rel, stride_kt, offs_d, D,
                                   qk_scale, BN, False, False, CHUNK, False, PREC)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, Kb, Vb, m0 - blk_lo, hi, rel, stride_kt, offs_d, D,
                                   qk_scale, BN, True, False, CHUNK, True, PREC)
    else:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, Kb, Vb, 0, hi, rel, stride_kt, offs_d, D,
                                   qk_scale, BN, True, True, CHUNK, True, PREC)
    o = acc / l_i[:, None]
    lse = m_i + tl.log2(l_i)
    optr = rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    _store_own(O32, OUT, optr, o, pos, m0, qmask, CHUNK, HAS_PAST)
    tl.store(LSE + rows * stride_lt + h, lse, mask=pos < L)


@triton.jit(do_not_specialize=["s"])
def _fwd_past_kernel(Q, K, V, DESC_K, DESC_V, O, OUT, LSE, TOK, SEG_START, TILE_SEG, TILE_FIRST, PASS_LO, BLK_START,
                     s, KS, NBT, qk_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
                     stride_lt, G, D, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, EVEN: tl.constexpr, LAST: tl.constexpr, PREC: tl.constexpr,
                     TMA: tl.constexpr):
    """Slot pass s: BM gathered queries of one (slot, head, block) segment against that block;
    merges the partial (o, lse2) into the running fp32 state O of those rows (the own-block pass
    wrote it first). LAST (slot KS-1, which every row with a pick fills, see _gate_kernel, so it
    runs last) writes the merged output in OUT's dtype instead (O and OUT share strides). TMA: the
    block's K/V tiles come through the tensor descriptors DESC_K, DESC_V (see _forward_past)."""
    tile = tl.load(PASS_LO + s) + tl.program_id(0)
    if tile >= tl.load(PASS_LO + s + 1):
        return
    r, g, h, ok, rows = _slot_tile(tile, TOK, SEG_START, TILE_SEG, TILE_FIRST, KS, NBT, BM)
    offs_d = tl.arange(0, BLOCK_D)
    qmask = ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    if TMA:
        acc, m_i, l_i = _fwd_inner_tma(acc, m_i, l_i, q, DESC_K, DESC_V, tl.load(BLK_START + g), (h // G) * D,
                                       qk_scale, BN, CHUNK, PREC)
    else:
        kv_base = tl.load(BLK_START + g).to(tl.int64) * stride_kt + (h // G) * stride_kh
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + kv_base, V + kv_base, 0, CHUNK, r, stride_kt, offs_d, D,
                                   qk_scale, BN, False, False, CHUNK, not EVEN, PREC)
    lse_b = m_i + tl.log2(l_i)
    optr = rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    lse_a = tl.load(LSE + rows * stride_lt + h, mask=ok, other=0.0)
    o_a = tl.load(O + optr, mask=qmask, other=0.0)
    mx = tl.maximum(lse_a, lse_b)
    lse_n = mx + tl.log2(tl.exp2(lse_a - mx) + tl.exp2(lse_b - mx))
    o_n = o_a * tl.exp2(lse_a - lse_n)[:, None] + (acc / l_i[:, None]) * tl.exp2(lse_b - lse_n)[:, None]
    if LAST:
        tl.store(OUT + optr, o_n.to(OUT.dtype.element_ty), mask=qmask)
    else:
        tl.store(O + optr, o_n, mask=qmask)
    tl.store(LSE + rows * stride_lt + h, lse_n, mask=ok)


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------


def default_cfg(q, chunk):
    if not q.is_cuda:
        return INTERP_CFG
    cfg = dict(GPU_CFG, **GPU_CFG_LONG_BLOCKS) if chunk >= 2048 else dict(GPU_CFG)
    if q.dtype == torch.float32:  # 4-byte tiles: the bf16 dQ / dK-dV pipelines would not fit in shared memory
        cfg.update(dq_bm=64, dq_warps=4, dq_stages=2, kv_bm=32, kv_bn=64, kv_warps=4, kv_stages=2)
    return cfg


def moba_gate_triton(q, k, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, cfg=None):
    """The Triton gate alone (tests, benchmarks): [T, H, KS] int32 picks, -1 = none."""
    if cfg is None:
        cfg = default_cfg(q, moba_chunk_size)
    q, k = q.contiguous(), k.contiguous()
    plan = _plan_blocks(q, k, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk)
    if moba_topk == 1:
        return torch.empty(q.shape[0], q.shape[1], 0, dtype=torch.int32, device=q.device)
    return _gate(q, k, plan, cfg)


def _forward_own(q, k, v, plan, cfg):
    """The own-block pass (needs only the block table): the final output of the rows without
    picks, the fp32 state of the others. Returns (out, o32, lse2)."""
    T, H, D, N, KS, B = (plan[x] for x in ("T", "H", "D", "N", "KS", "B"))
    out = torch.empty_like(q)
    o32 = out if (q.dtype == torch.float32 or KS == 0) else torch.empty(T, H, D, dtype=torch.float32,
                                                                         device=q.device)
    lse2 = torch.empty(T, H, dtype=torch.float32, device=q.device)  # log2-sum-exp2
    BM, BN = cfg["fwd_bm"], cfg["fwd_bn"]
    _fwd_own_kernel[(_cdiv(plan["max_seqlen"], BM), N, H)](
        q, k, v, o32, out, lse2, plan["cu"], D**-0.5 * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        o32.stride(0), o32.stride(1), lse2.stride(0), H // plan["Hkv"], D, CHUNK=B,
        BLOCK_D=triton.next_power_of_2(D), BM=BM, BN=BN, ALIGNED=B % BM == 0 and BM % BN == 0,
        HAS_PAST=KS > 0, PREC=_prec(q.dtype), num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    return out, o32, lse2


def _forward_past(q, k, v, out, o32, lse2, plan, cfg):
    """Slot passes 0 .. KS-1 (needs the whole plan): each merges into the fp32 state, the last
    one (slot KS-1, which every row with a pick fills) writes the output."""
    H, D, KS, B, NBT = (plan[x] for x in ("H", "D", "KS", "B", "NBT"))
    BM, BN = cfg["fwd_bm"], cfg["fwd_bn"]
    tiles = _tiles(plan, BM)
    desc_k, desc_v, tma = _kv_descriptors(k, v, B, BN, cfg["fwd_tma"])
    for s in range(KS):
        _fwd_past_kernel[(tiles["UB"],)](
            q, k, v, desc_k, desc_v, o32, out, lse2, plan["tok"], plan["seg_bounds"], tiles["tile_seg"],
            tiles["tile_first"], tiles["pass_lo"], plan["blk_start"], s, KS, NBT, D**-0.5 * LOG2E, q.stride(0),
            q.stride(1), k.stride(0), k.stride(1), o32.stride(0), o32.stride(1), lse2.stride(0), H // plan["Hkv"], D,
            CHUNK=B,
            BLOCK_D=triton.next_power_of_2(D), BM=BM, BN=BN, EVEN=B % BN == 0, LAST=s == KS - 1,
            PREC=_prec(q.dtype), TMA=tma, num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])


def _forward(q, k, v, plan, cfg):
    """Own block, then the slot passes, for a finished plan (benchmarks time the phases apart;
    _MobaTriton launches the own block before the plan). Returns (out, lse2)."""
    out, o32, lse2 = _forward_own(q, k, v, plan, cfg)
    if plan["KS"] > 0:
        _forward_past(q, k, v, out, o32, lse2, plan, cfg)
    return out, lse2


class _MobaTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, chunk, topk, cfg):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        plan = _plan_blocks(q, k, cu_seqlens, max_seqlen, chunk, topk)
        # own block first: the GPU works on it while the host launches the plan's ~15 kernels
        out, o32, lse2 = _forward_own(q, k, v, plan, cfg)
        if topk > 1:
            _plan_picks(q, k, plan, cfg)
            _forward_past(q, k, v, out, o32, lse2, plan, cfg)
        del o32
        ctx.set_materialize_grads(False)  # no zero-filled dlse when the lse output is unused
        ctx.plan = plan  # device tensors of the plan (and its tile schedules) stay with ctx
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, out, lse2)
        return out, lse2 * LN2

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse2 = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse2, dout, dlse, ctx.plan, ctx.cfg)
        ctx.plan = None
        return dq, dk, dv, None, None, None, None, None


def moba_attn_varlen_triton(q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, *, return_lse=False,
                            cfg=None):
    """Triton MoBA (see module docstring). max_seqlen must be >= the longest sequence."""
    if cfg is None:
        cfg = default_cfg(q, moba_chunk_size)
    out, lse = _MobaTriton.apply(q, k, v, cu_seqlens, int(max_seqlen), int(moba_chunk_size), int(moba_topk), cfg)
    return (out, lse) if return_lse else out
