"""The two MoBA pieces of moba_pieces.py on the GPU, with megamod's Triton MoBA kernels.

own     _plan_blocks' table of the local runs and the own-block pass (topk 1) with an fp32 output;
        its backward is moba_backward._backward of that plan, given the merged output and lse.
blocks  a plan built from explicit picks instead of the gate: the sort keys of the (query, head,
        slot) entries come from ``sel`` and the block table ``blk_start``, then the same entry
        list, tile schedule and slot passes as the single-device kernels (moba_triton.py),
        starting from an empty state (o = 0, lse = −inf); backward: the dQ slot passes and the
        dK/dV kernel without own-block queries (OWN off: these blocks are only ever picked).
gate    _gate_kernel over runs of queries at given positions (HAS_POS0) against given block
        means: the single-device gate's products and tie rule, so the picks are its picks.
All in log2 inside (the kernels' base), natural log at the interface.
"""
from __future__ import annotations

import torch
import triton

from megamod.ops.moba_backward import _backward, _dkdv, _dq_past
from megamod.ops.moba_plan import (LOG2E, _block_mean_kernel, _cdiv, _entries_kernel, _launch_gate, _plan_blocks, _prec,
                                   gate_precision)
from megamod.ops.moba_triton import _forward_past, _fwd_own_kernel, default_cfg

LN2 = 0.6931471805599453


@torch.no_grad()
def block_means(k, cu_seqlens, chunk):
    """[NB, Hkv, D] fp32 block means of the runs of cu_seqlens (the gate's _block_mean_kernel)."""
    plan = _plan_blocks(k, k, cu_seqlens, 0, chunk, 1)
    nb = k.shape[0] // chunk  # the runs are whole blocks (context parallelism's chunks)
    T, Hkv, D = k.shape
    mean = torch.empty(plan["NBT"], Hkv, D, dtype=torch.float32, device=k.device)
    _block_mean_kernel[(plan["NBT"], Hkv)](k, mean, plan["blk_start"], plan["blk_len"], k.stride(0), k.stride(1),
                                           mean.stride(0), mean.stride(1), 0, D, BLOCK_D=triton.next_power_of_2(D),
                                           BR=32, SPLIT=False)
    return mean[:nb]


@torch.no_grad()
def gate_at(q, means, cu_seqlens, pos0, blk_first, chunk, topk, cfg=None):
    """[T, H, KS] int32 ids into ``means`` (moba_pieces.moba_gate_at)."""
    cfg = default_cfg(q, chunk) if cfg is None else cfg
    q = q.contiguous()
    T, H, D = q.shape
    KS = topk - 1
    sel = torch.empty(T, H, KS, dtype=torch.int32, device=q.device)
    if KS == 0:
        return sel
    prec = gate_precision(cfg, q.dtype)
    mean = means.contiguous()
    stride_mp = 0
    if prec == "bf16split":  # the three bf16 parts _block_mean_kernel's SPLIT stores, in the same roundings
        hi = mean.to(torch.bfloat16)
        rest = mean - hi.float()
        mid = rest.to(torch.bfloat16)
        mean = torch.stack([hi, mid, (rest - mid.float()).to(torch.bfloat16)], dim=2)  # [NB, Hkv, 3, D]
        stride_mp = mean.stride(2)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return _launch_gate(q, mean, stride_mp, sel, cu, blk_first.to(device=q.device, dtype=torch.int32),
                        pos0.to(device=q.device, dtype=torch.int32), max_len, means.shape[0], chunk, KS, prec, False, cfg)


# ---- own piece ------------------------------------------------------------------------------


def own_forward(q, k, v, cu_seqlens, max_seqlen, chunk, cfg=None):
    cfg = default_cfg(q, chunk) if cfg is None else cfg
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    plan = _plan_blocks(q, k, cu_seqlens, max_seqlen, chunk, 1)
    T, H, D = q.shape
    out = torch.empty(T, H, D, dtype=torch.float32, device=q.device)
    lse2 = torch.empty(T, H, dtype=torch.float32, device=q.device)
    BM, BN = cfg["fwd_bm"], cfg["fwd_bn"]
    _fwd_own_kernel[(_cdiv(max_seqlen, BM), plan["N"], H)](
        q, k, v, out, out, lse2, plan["cu"], D**-0.5 * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        out.stride(0), out.stride(1), lse2.stride(0), H // plan["Hkv"], D, CHUNK=chunk,
        BLOCK_D=triton.next_power_of_2(D), BM=BM, BN=BN, ALIGNED=chunk % BM == 0 and BM % BN == 0,
        HAS_PAST=False, PREC=_prec(q.dtype), num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    return out, lse2 * LN2, dict(q=q, k=k, v=v, plan=plan, cfg=cfg)


def own_backward(do, out, lse, state):
    q, k, v = state["q"], state["k"], state["v"]
    return _backward(q, k, v, out.contiguous(), (lse * LOG2E).contiguous(), do.to(q.dtype).contiguous(), None,
                     state["plan"], state["cfg"])


# ---- blocks piece ---------------------------------------------------------------------------


def _picks_plan(q, k, blk_start, sel, chunk):
    """The plan of the slot passes from explicit picks (moba_plan._plan_picks without the gate)."""
    T, H, D = q.shape
    KS, NBT, dev = sel.shape[2], blk_start.numel(), q.device
    s = torch.arange(KS, device=dev, dtype=torch.int32)
    h = torch.arange(H, device=dev, dtype=torch.int32)[:, None]
    NSEG = KS * H * NBT
    key = torch.where(sel >= 0, (h * NBT + sel) * KS + s, NSEG).view(-1)  # segment (h·NBT + g)·KS + s
    skey, perm = torch.sort(key, stable=True)
    E = skey.numel()
    tok = torch.empty(E, dtype=torch.int32, device=dev)
    bounds = torch.empty(NSEG + 1, dtype=torch.int32, device=dev)
    R = 1024
    npe = _cdiv(E, R)
    _entries_kernel[(npe + _cdiv(NSEG + 1, R),)](perm, skey, tok, bounds, E, NSEG, H * KS, E.bit_length() + 1, npe,
                                                  R=R)
    blk_start = blk_start.to(device=dev, dtype=torch.int32)
    return dict(T=T, H=H, Hkv=k.shape[1], D=D, KS=KS, B=chunk, NBT=NBT, blk_start=blk_start,
                blk_len=torch.full_like(blk_start, chunk), tok=tok, seg_bounds=bounds)


def blocks_forward(q, k, v, blk_start, sel, chunk, cfg=None):
    cfg = default_cfg(q, chunk) if cfg is None else cfg
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # the slot passes need a row's p picks in its last p slots (the last pass writes every row with one)
    plan = _picks_plan(q, k, blk_start, sel.sort(-1).values.to(torch.int32), chunk)
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)  # rows without picks: o = 0, lse = −inf
    lse2 = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    _forward_past(q, k, v, out, out, lse2, plan, cfg)  # the state starts empty; the last pass writes fp32
    return out, lse2 * LN2, dict(q=q, k=k, v=v, plan=plan, cfg=cfg)


def blocks_backward(do, out, lse, state):
    q, k, v, plan, cfg = (state[x] for x in ("q", "k", "v", "plan", "cfg"))
    T, H, D = q.shape
    do = do.to(q.dtype).contiguous()
    lse2 = (lse * LOG2E).contiguous()
    delta = (do.float() * out.float()).sum(-1)  # rowsum(dO ∘ O) of the merged output; no lse gradient
    dq = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)  # rows without picks get 0
    _dq_past(q, k, v, do, lse2, delta, dq, dq, plan, cfg)
    dk, dv = _dkdv(q, k, v, do, lse2, delta, plan, plan["tok"], plan["seg_bounds"], cfg, own=False)
    return dq, dk, dv
