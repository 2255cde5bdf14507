"""MoBA on the GPU, part 3: the exact backward (step 5 of megamod/ops/moba_triton.py's docstring).

dQ like the forward: the own block first (it also computes delta = rowsum(dO * O) - dlse of its
rows, which everything after it reads), then slot passes 0 .. KS-1 into fp32, the last writing dq;
dK/dV per (block, key tile, kv head): own-block queries, then every segment that picked the block,
for each query head of the GQA group. No atomics, so results are deterministic (dQ added atomically
inside the dK/dV loop, as FlashAttention-2 does, measured 1.4-1.7x slower: NOTES_moba.md, session
4). Tile configs: moba_triton.GPU_CFG. On Hopper, for bf16 inputs of head dim 64 or 128, dK/dV runs
the Gluon kernel of moba_gluon.py instead (cfg kv_impl="gluon", the default there; same contract,
same results).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from megamod.ops.moba_plan import (LOG2E, _cdiv, _kv_descriptors, _prec, _query_tile, _slot_tile, _store_own,
                                   _tiles)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, Kb, Vb, n_lo, n_hi, pos, stride_kt, offs_d, D, qk_scale,
              BN: tl.constexpr, CAUSAL: tl.constexpr, SAME_BLOCK: tl.constexpr, CHUNK: tl.constexpr,
              KMASK: tl.constexpr, PREC: tl.constexpr):
    for n0 in range(n_lo, n_hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        kmask = offs_d[None, :] < D
        if KMASK:
            kmask = kmask & (offs_n[:, None] < n_hi)
        kp = offs_n[:, None] * stride_kt + offs_d[None, :]  # int32: inside one block's span
        k = tl.load(Kb + kp, mask=kmask, other=0.0)
        v = tl.load(Vb + kp, mask=kmask, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse2[:, None])
        if CAUSAL:
            vis = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] < n_hi)
            if SAME_BLOCK:
                vis = vis & ((offs_n[None, :] // CHUNK) == (pos[:, None] // CHUNK))
            p = tl.where(vis, p, 0.0)
        elif KMASK:
            p = tl.where(offs_n[None, :] < n_hi, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _dq_inner_tma(dq, q, do, lse2, delta, desc_k, desc_v, row0, col, qk_scale, BN: tl.constexpr,
                  CHUNK: tl.constexpr, PREC: tl.constexpr):
    """_dq_inner over a whole (picked, so complete) block whose K/V tiles come by TMA (as
    moba_triton._fwd_inner_tma)."""
    for n0 in range(0, CHUNK, BN):
        k = desc_k.load([row0 + n0, col])
        v = desc_v.load([row0 + n0, col])
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _dq_own_kernel(Q, K, V, O, DO, LSE, DLSE, DELTA, DQ32, DQ, CU, qk_scale, sm_scale, stride_qt, stride_qh,
                   stride_kt, stride_kh, stride_lt, G, D, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, ALIGNED: tl.constexpr, HAS_PAST: tl.constexpr, HAS_DLSE: tl.constexpr,
                   PREC: tl.constexpr):
    """dQ from the own block, run first: computes and stores delta = rowsum(dO * O) - dlse of its
    rows, then writes dQ: with HAS_PAST in fp32 into DQ32 for the rows with picks (position >=
    CHUNK), which the slot passes add to, and in DQ's dtype for the others (q, O, dO, DQ32, DQ
    share the [T, H, D] strides; DQ32 and DQ may be the same tensor)."""
    n, h, s0, L, m0, pos, rows = _query_tile(CU, BM)
    if m0 >= L:
        return
    offs_d = tl.arange(0, BLOCK_D)
    qmask = (pos[:, None] < L) & (offs_d[None, :] < D)
    qp = rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(Q + qp, mask=qmask, other=0.0)
    do = tl.load(DO + qp, mask=qmask, other=0.0)
    lse2 = tl.load(LSE + rows * stride_lt + h, mask=pos < L, other=float("inf"))
    delta = tl.sum(tl.load(O + qp, mask=qmask, other=0.0).to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows * stride_lt + h, mask=pos < L, other=0.0)
    tl.store(DELTA + rows * stride_lt + h, delta, mask=pos < L)
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    blk_lo = (m0 // CHUNK) * CHUNK
    kv_base = (s0 + blk_lo).to(tl.int64) * stride_kt + (h // G) * stride_kh
    Kb = K + kv_base
    Vb = V + kv_base
    rel = pos - blk_lo
    hi = tl.minimum(L, m0 + BM) - blk_lo
    if ALIGNED:
        dq = _dq_inner(dq, q, do, lse2, delta, Kb, Vb, 0, m0 - blk_lo, rel, stride_kt, offs_d, D, qk_scale,
                       BN, False, False, CHUNK, False, PREC)
        dq = _dq_inner(dq, q, do, lse2, delta, Kb, Vb, m0 - blk_lo, hi, rel, stride_kt, offs_d, D, qk_scale,
                       BN, True, False, CHUNK, True, PREC)
    else:
        dq = _dq_inner(dq, q, do, lse2, delta, Kb, Vb, 0, hi, rel, stride_kt, offs_d, D, qk_scale,
                       BN, True, True, CHUNK, True, PREC)
    dq = dq * sm_scale
    _store_own(DQ32, DQ, qp, dq, pos, m0, qmask, CHUNK, HAS_PAST)


@triton.jit(do_not_specialize=["s"])
def _dq_past_kernel(Q, K, V, DESC_K, DESC_V, DO, LSE, DELTA, DQ32, DQ, TOK, SEG_START, TILE_SEG, TILE_FIRST, PASS_LO,
                    BLK_START, s, KS, NBT, qk_scale, sm_scale, stride_qt, stride_qh, stride_kt, stride_kh,
                    stride_lt, G, D, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, EVEN: tl.constexpr, LAST: tl.constexpr, PREC: tl.constexpr,
                    TMA: tl.constexpr):
    """Slot pass s of dQ: adds the picked block's contribution to the fp32 dQ rows (the own-block
    pass wrote them first); LAST (slot KS-1, which every row with a pick fills, so it runs last)
    writes the sum in DQ's dtype instead. TMA: K/V tiles through DESC_K, DESC_V."""
    tile = tl.load(PASS_LO + s) + tl.program_id(0)
    if tile >= tl.load(PASS_LO + s + 1):
        return
    r, g, h, ok, rows = _slot_tile(tile, TOK, SEG_START, TILE_SEG, TILE_FIRST, KS, NBT, BM)
    offs_d = tl.arange(0, BLOCK_D)
    qmask = ok[:, None] & (offs_d[None, :] < D)
    qp = rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(Q + qp, mask=qmask, other=0.0)
    do = tl.load(DO + qp, mask=qmask, other=0.0)
    lse2 = tl.load(LSE + rows * stride_lt + h, mask=ok, other=float("inf"))
    delta = tl.load(DELTA + rows * stride_lt + h, mask=ok, other=0.0)
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    if TMA:
        dq = _dq_inner_tma(dq, q, do, lse2, delta, DESC_K, DESC_V, tl.load(BLK_START + g), (h // G) * D, qk_scale,
                           BN, CHUNK, PREC)
    else:
        kv_base = tl.load(BLK_START + g).to(tl.int64) * stride_kt + (h // G) * stride_kh
        dq = _dq_inner(dq, q, do, lse2, delta, K + kv_base, V + kv_base, 0, CHUNK, r, stride_kt, offs_d, D,
                       qk_scale, BN, False, False, CHUNK, not EVEN, PREC)
    dq = tl.load(DQ32 + qp, mask=qmask, other=0.0) + dq * sm_scale
    if LAST:
        tl.store(DQ + qp, dq.to(DQ.dtype.element_ty), mask=qmask)
    else:
        tl.store(DQ32 + qp, dq, mask=qmask)


@triton.jit
def _kv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, TOK, tok0, row0, m_lo, m_hi, offs_n, h, stride_qt, stride_qh,
              stride_lt, offs_d, D, qk_scale, BM: tl.constexpr, GATHER: tl.constexpr, CAUSAL: tl.constexpr,
              PREC: tl.constexpr, EVEN_D: tl.constexpr, ROW64: tl.constexpr):
    """Accumulate dK, dV of one key tile over query rows [m_lo, m_hi): contiguous tokens row0 + m,
    or (GATHER) the tokens TOK[tok0 + m]. CAUSAL: local query position m >= key position.

    The loop is instruction-bound, so it carries no per-element masks: rows past m_hi repeat the
    last row (always a valid address) and get lse = +inf, so their p, and with it their dS, is 0;
    offsets are int32 unless ROW64 (q, or the sorted entry list, over 2^31 elements); EVEN_D: D is
    the tile width."""
    for m0 in range(m_lo, m_hi, BM):
        m = m0 + tl.arange(0, BM)
        mc = tl.minimum(m, m_hi - 1)
        if GATHER:
            rows = tl.load(TOK + tok0 + mc)
        else:
            rows = row0 + mc
        if ROW64:
            rows = rows.to(tl.int64)
        qp = rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
        if EVEN_D:
            q = tl.load(Q + qp)
            do = tl.load(DO + qp)
        else:
            q = tl.load(Q + qp, mask=offs_d[None, :] < D, other=0.0)
            do = tl.load(DO + qp, mask=offs_d[None, :] < D, other=0.0)
        lse2 = tl.where(m < m_hi, tl.load(LSE + rows * stride_lt + h), float("inf"))
        delta = tl.load(DELTA + rows * stride_lt + h)
        pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse2[None, :])  # [BN, BM]
        if CAUSAL:
            pT = tl.where(m[None, :] >= offs_n[:, None], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TOK, SEG_START, BLK_START, BLK_LEN, H, NBT, NKT,
                 KS, qk_scale, sm_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, G, D,
                 BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                 EVEN_D: tl.constexpr, ROW64: tl.constexpr, OWN: tl.constexpr):
    """dK, dV of BN keys of block g for kv head hk: own-block queries (causal; unless OWN is off:
    blocks that are only ever picked, moba_pieces_triton), then every segment (slot s, head h,
    block g) of queries that picked g, for the G query heads of hk."""
    pid = tl.program_id(0)
    g = pid // NKT
    n_lo = (pid % NKT) * BN
    hk = tl.program_id(1)
    blen = tl.load(BLK_LEN + g)
    if n_lo >= blen:
        return
    start = tl.load(BLK_START + g)
    offs_n = n_lo + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    kmask = (offs_n[:, None] < blen) & (offs_d[None, :] < D)
    kp = (start + offs_n).to(tl.int64)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :]
    k = tl.load(K + kp, mask=kmask, other=0.0)
    v = tl.load(V + kp, mask=kmask, other=0.0)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    for hh in range(G):
        h = hk * G + hh
        if OWN:  # own block: rows on the diagonal (masked), then the later rows of the block
            dk, dv = _kv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, TOK, 0, start, n_lo, tl.minimum(n_lo + BN, blen),
                               offs_n, h, stride_qt, stride_qh, stride_lt, offs_d, D, qk_scale, BM, False, True, PREC,
                               EVEN_D, ROW64)
            dk, dv = _kv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, TOK, 0, start, n_lo + BN, blen, offs_n, h,
                               stride_qt, stride_qh, stride_lt, offs_d, D, qk_scale, BM, False, False, PREC, EVEN_D,
                               ROW64)
        # all slots of (h, g) are one contiguous run of the sorted entries
        lo = tl.load(SEG_START + (h * NBT + g) * KS)
        hi = tl.load(SEG_START + (h * NBT + g) * KS + KS)
        if ROW64:
            lo = lo.to(tl.int64)
        dk, dv = _kv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, TOK, lo, 0, 0, hi - lo, offs_n, h,
                           stride_qt, stride_qh, stride_lt, offs_d, D, qk_scale, BM, True, False, PREC, EVEN_D,
                           ROW64)
    tl.store(DK + kp, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + kp, dv.to(DV.dtype.element_ty), mask=kmask)


@functools.lru_cache(maxsize=None)
def _moba_gluon():
    """megamod.ops.moba_gluon, or None where this Triton has no Gluon (or not the parts it uses):
    the Triton dK/dV kernel then runs instead."""
    try:
        from megamod.ops import moba_gluon
    except (ImportError, AttributeError):
        return None
    return moba_gluon


def _backward(q, k, v, out, lse2, dout, dlse, plan, cfg):
    """dq, dk, dv; dlse (the gradient of the ln-based lse output) may be None."""
    T, H, D, N, KS, B, NBT = (plan[x] for x in ("T", "H", "D", "N", "KS", "B", "NBT"))
    Hkv = plan["Hkv"]
    G = H // Hkv
    BLOCK_D = triton.next_power_of_2(D)
    sm_scale = D**-0.5
    qk_scale = sm_scale * LOG2E
    prec = _prec(q.dtype)
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    delta = torch.empty(T, H, dtype=torch.float32, device=q.device)  # written by _dq_own_kernel
    has_dlse = dlse is not None
    dlse = dlse.contiguous().float() if has_dlse else delta  # without HAS_DLSE the pointer is not read
    # dQ: the own block first (with delta; it writes the fp32 rows of the tokens with picks), then
    # one pass per slot, the last (KS-1) writing dq in q's dtype
    dq = torch.empty_like(q)
    dq32 = dq if (q.dtype == torch.float32 or KS == 0) else torch.empty(T, H, D, dtype=torch.float32,
                                                                        device=q.device)
    BM, BN = cfg["dq_bm"], cfg["dq_bn"]
    _dq_own_kernel[(_cdiv(plan["max_seqlen"], BM), N, H)](
        q, k, v, out, dout, lse2, dlse, delta, dq32, dq, plan["cu"], qk_scale, sm_scale, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), lse2.stride(0), G, D, CHUNK=B, BLOCK_D=BLOCK_D, BM=BM, BN=BN,
        ALIGNED=B % BM == 0 and BM % BN == 0, HAS_PAST=KS > 0, HAS_DLSE=has_dlse,
        PREC=prec, num_warps=cfg["dq_warps"], num_stages=cfg["dq_stages"])
    if KS > 0:
        _dq_past(q, k, v, dout, lse2, delta, dq32, dq, plan, cfg)
    del dq32
    # dK, dV: one program per (block, key tile, kv head); in Gluon on Hopper (moba_gluon)
    tok, bounds = (plan["tok"], plan["seg_bounds"]) if KS > 0 else (plan["blk_len"], plan["blk_len"])
    dk, dv = _dkdv(q, k, v, dout, lse2, delta, plan, tok, bounds, cfg, own=True)
    return dq, dk, dv


def _dq_past(q, k, v, dout, lse2, delta, dq32, dq, plan, cfg):
    """dQ slot passes 0 .. KS-1 into the fp32 rows dq32 (written before), the last writing dq."""
    T, H, D = q.shape
    KS, B, NBT = plan["KS"], plan["B"], plan["NBT"]
    sm_scale = D**-0.5
    BM, BN = cfg["dq_bm"], cfg["dq_bn"]
    tiles = _tiles(plan, BM)
    desc_k, desc_v, tma = _kv_descriptors(k, v, B, BN, cfg["dq_tma"])
    for s in range(KS):
        _dq_past_kernel[(tiles["UB"],)](
            q, k, v, desc_k, desc_v, dout, lse2, delta, dq32, dq, plan["tok"], plan["seg_bounds"], tiles["tile_seg"],
            tiles["tile_first"], tiles["pass_lo"], plan["blk_start"], s, KS, NBT, sm_scale * LOG2E, sm_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse2.stride(0), H // plan["Hkv"], D, CHUNK=B,
            BLOCK_D=triton.next_power_of_2(D), BM=BM, BN=BN, EVEN=B % BN == 0, LAST=s == KS - 1,
            PREC=_prec(q.dtype), TMA=tma, num_warps=cfg["dq_warps"], num_stages=cfg["dq_stages"])


def _dkdv(q, k, v, dout, lse2, delta, plan, tok, bounds, cfg, own: bool):
    """dk, dv of every block of the plan's table (own: its own-block queries too)."""
    T, H, D = q.shape
    Hkv, KS, B, NBT = plan["Hkv"], plan["KS"], plan["B"], plan["NBT"]
    sm_scale = D**-0.5
    qk_scale = sm_scale * LOG2E
    if cfg["kv_impl"] == "gluon" and q.is_cuda:  # (Gluon is imported on the GPU only)
        gluon_kv = _moba_gluon()
        if gluon_kv is not None and gluon_kv.supported(q, k, tok):
            return gluon_kv.dkdv(q, k, v, dout, lse2, delta, plan, tok, bounds, qk_scale, sm_scale, own=own)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    BM, BN = cfg["kv_bm"], cfg["kv_bn"]
    assert BN % BM == 0, "kv_bn must be a multiple of kv_bm (the diagonal loop covers BN rows)"
    NKT = _cdiv(B, BN)
    BLOCK_D = triton.next_power_of_2(D)
    _dkdv_kernel[(NBT * NKT, Hkv)](
        q, k, v, dout, lse2, delta, dk, dv, tok, bounds,
        plan["blk_start"], plan["blk_len"], H, NBT, NKT, KS, qk_scale, sm_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse2.stride(0), H // Hkv, D, BLOCK_D=BLOCK_D, BM=BM,
        BN=BN, PREC=_prec(q.dtype), EVEN_D=D == BLOCK_D, ROW64=max(q.numel(), tok.numel()) > 2**31, OWN=own,
        num_warps=cfg["kv_warps"], num_stages=cfg["kv_stages"])
    return dk, dv
