"""MoBA on the GPU, part 4: dK/dV in Gluon for Hopper (wgmma), the default on sm_90 for bf16 inputs.

The same work as moba_backward._dkdv_kernel (one program per (block, 128-key tile, kv head): the
own-block queries, causal on the diagonal, then every segment of gathered queries that picked the
block, for each query head of the GQA group), written in Gluon, Triton's lower-level dialect, so
that the schedule is ours instead of the pipeliner's:

  - Everything a step reads from memory is requested a step ahead: the gathered q/dO rows and
    their lse and delta go by cp.async into a two-slot shared-memory ring, and the token indices
    of the tile after that are loaded into registers. (Triton's pipeliner issues the index load
    and the dependent lse/delta loads inside the step, so each step waited on two round trips.)
  - The four products of a step are asynchronous wgmma with explicit waits: S = k.q^T and
    dP = v.dO^T are issued together and only S is waited for, so dP runs under the exp2; dV is
    issued before waiting for dP, so it runs under dS; dK and dV then stay in flight until the
    next step's S (in order, S finishing implies they did, and so frees the other ring slot).
  - P and dS feed the dV/dK products from registers; 253-255 registers, no spills to speak of
    (the Triton kernel spills at 255).

Measured on an H100 (benchmarks/experiments/NOTES_moba.md, session 5): dK/dV 1.36x faster at 32K/512, 1.25x
at 128K/512, 1.28x at 1M/4096 (head dim 128; the whole backward 1.24-1.29x at head dim 64), and
bit-identical to the Triton kernel's dk/dv (same products in the same order). Gluon has no CPU interpreter: CI compiles the kernel for sm_90 offline
(tests/unit/test_moba_gluon.py); correctness runs on the GPU (benchmarks/moba_check.py).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma, warpgroup_mma_init,
                                                               warpgroup_mma_wait)

from megamod.ops.moba_plan import _cdiv

# Names that moved between Triton 3.6 (the GPU image) and later releases (PyPI's, which compiles
# the kernel offline in CI): cp.async of a pointer tensor, and the CTA-wide barrier.
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BM, BN, NUM_WARPS = 64, 128, 8  # queries per step, keys per program (two warpgroups of 64), warps


@gluon.jit
def _tile_rows(TOK, tok0, row0, m0, m_hi, BM: gl.constexpr, GATHER: gl.constexpr, L: gl.constexpr):
    """Token rows of the query tile at m0, in layout L: TOK[tok0 + m] (GATHER) or row0 + m. Rows
    past m_hi repeat the last one (a valid address; the step gives them lse = +inf, so p = 0)."""
    mc = gl.minimum(m0 + gl.arange(0, BM, layout=L), m_hi - 1)
    if GATHER:
        return gl.load(TOK + tok0 + mc)
    else:
        return row0 + mc


@gluon.jit
def _issue_rows(q_buf, do_buf, l_buf, d_buf, Q, DO, LSE, DELTA, rows, h, stride_qt, stride_qh, stride_lt,
                D: gl.constexpr, LD: gl.constexpr, L1: gl.constexpr):
    """cp.async of the q and dO rows and their lse and delta into one ring slot, as one group."""
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
    qp = rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    _cp_async(q_buf, Q + qp)
    _cp_async(do_buf, DO + qp)
    r1 = gl.convert_layout(rows, L1)
    _cp_async(l_buf, LSE + r1 * stride_lt + h)
    _cp_async(d_buf, DELTA + r1 * stride_lt + h)
    async_copy.commit_group()


@gluon.jit
def _kv_loop(dk, dv, k_s, v_s, q_s, do_s, l_s, d_s, Q, DO, LSE, DELTA, TOK, tok0, row0, m_lo, m_hi, offs_n, h,
             stride_qt, stride_qh, stride_lt, qk_scale, BM: gl.constexpr, D: gl.constexpr, GATHER: gl.constexpr,
             CAUSAL: gl.constexpr, LD: gl.constexpr, MMA_S: gl.constexpr, A_OP: gl.constexpr):
    """Accumulate dK, dV of the program's keys over the query rows [m_lo, m_hi) (see _tile_rows);
    CAUSAL: local query position m >= key position."""
    n_it = gl.cdiv(m_hi - m_lo, BM)
    if n_it > 0:
        BN: gl.constexpr = offs_n.shape[0]
        RL: gl.constexpr = gl.SliceLayout(1, LD)
        CL: gl.constexpr = gl.SliceLayout(0, MMA_S)
        L1: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        # the previous loop's last step may still be reading slot 0 in another warp (lse/delta, or a
        # warpgroup's last dK product): wait for every warp before refilling the ring
        _cta_barrier()
        rows = _tile_rows(TOK, tok0, row0, m_lo, m_hi, BM, GATHER, RL)
        _issue_rows(q_s.index(0), do_s.index(0), l_s.index(0), d_s.index(0), Q, DO, LSE, DELTA, rows, h, stride_qt,
                    stride_qh, stride_lt, D, LD, L1)
        rows_n = _tile_rows(TOK, tok0, row0, m_lo + BM, m_hi, BM, GATHER, RL)
        # register operands of the previous step's dV/dK products: kept alive until those finish
        p_op = gl.zeros([BN, BM], gl.bfloat16, A_OP)
        ds_op = gl.zeros([BN, BM], gl.bfloat16, A_OP)
        dk = warpgroup_mma_init(dk)
        dv = warpgroup_mma_init(dv)
        for it in range(n_it):
            slot = it % 2
            m0 = m_lo + it * BM
            async_copy.wait_group(0)
            _cta_barrier()
            fence_async_shared()
            q_buf = q_s.index(slot)
            do_buf = do_s.index(slot)
            zero = gl.zeros([BN, BM], gl.float32, MMA_S)
            s = warpgroup_mma(k_s, q_buf.permute((1, 0)), zero, use_acc=False, is_async=True)
            dp = warpgroup_mma(v_s, do_buf.permute((1, 0)), zero, use_acc=False, is_async=True)
            # S done, and (in order) the previous step's dV/dK, so the other slot is free; dP in flight
            s, dk, dv, p_op, ds_op = warpgroup_mma_wait(1, deps=(s, dk, dv, p_op, ds_op))
            if it + 1 < n_it:
                _issue_rows(q_s.index(1 - slot), do_s.index(1 - slot), l_s.index(1 - slot), d_s.index(1 - slot), Q,
                            DO, LSE, DELTA, rows_n, h, stride_qt, stride_qh, stride_lt, D, LD, L1)
            lse2 = l_s.index(slot).load(CL)
            delta = d_s.index(slot).load(CL)
            rows_n = _tile_rows(TOK, tok0, row0, m0 + 2 * BM, m_hi, BM, GATHER, RL)
            m = m0 + gl.arange(0, BM, layout=CL)
            pT = gl.exp2(s * qk_scale - gl.where(m < m_hi, lse2, float("inf"))[None, :])  # [BN, BM]
            if CAUSAL:
                pT = gl.where(m[None, :] >= offs_n[:, None], pT, 0.0)
            p_op = gl.convert_layout(pT.to(gl.bfloat16), A_OP)
            dv = warpgroup_mma(p_op, do_buf, dv, is_async=True)
            dp, p_op = warpgroup_mma_wait(1, deps=(dp, p_op))
            dsT = pT * (dp - delta[None, :])
            ds_op = gl.convert_layout(dsT.to(gl.bfloat16), A_OP)
            dk = warpgroup_mma(ds_op, q_buf, dk, is_async=True)
        dk, dv, p_op, ds_op = warpgroup_mma_wait(0, deps=(dk, dv, p_op, ds_op))
    return dk, dv


@gluon.jit
def _dkdv_gluon_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TOK, SEG_START, BLK_START, BLK_LEN, NBT, NKT, KS, qk_scale,
                       sm_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, G, D: gl.constexpr,
                       BM: gl.constexpr, BN: gl.constexpr, TPW_D: gl.constexpr, OWN: gl.constexpr,
                       num_warps: gl.constexpr):
    """dK, dV of BN keys of block g for kv head hk (moba_backward._dkdv_kernel's contract, OWN
    included; bf16, int32 offsets)."""
    pid = gl.program_id(0)
    g = pid // NKT
    n_lo = (pid % NKT) * BN
    hk = gl.program_id(1)
    blen = gl.load(BLK_LEN + g)
    if n_lo < blen:
        start = gl.load(BLK_START + g)
        # loads: 16-byte chunks of a row, TPW_D = D / 8 threads across a row
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [num_warps, 1], [1, 0])
        MMA_S: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BM, 16])
        MMA_D: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, D, 16])
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA_D, k_width=2)
        KV_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], gl.bfloat16)
        Q_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16)
        V_SL: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        k_s = gl.allocate_shared_memory(gl.bfloat16, [BN, D], KV_SL)
        v_s = gl.allocate_shared_memory(gl.bfloat16, [BN, D], KV_SL)
        q_s = gl.allocate_shared_memory(gl.bfloat16, [2, BM, D], Q_SL)
        do_s = gl.allocate_shared_memory(gl.bfloat16, [2, BM, D], Q_SL)
        l_s = gl.allocate_shared_memory(gl.float32, [2, BM], V_SL)
        d_s = gl.allocate_shared_memory(gl.float32, [2, BM], V_SL)
        kn = n_lo + gl.arange(0, BN, layout=gl.SliceLayout(1, LD))
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
        kp = (start + gl.minimum(kn, blen - 1))[:, None] * stride_kt + hk * stride_kh + offs_d[None, :]
        _cp_async(k_s, K + kp)  # waited for with the first step's rows
        _cp_async(v_s, V + kp)
        async_copy.commit_group()
        offs_n = n_lo + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA_S))
        dk = gl.zeros([BN, D], gl.float32, MMA_D)
        dv = gl.zeros([BN, D], gl.float32, MMA_D)
        for hh in range(G):
            h = hk * G + hh
            if OWN:  # own block: rows on the diagonal (masked), then the later rows of the block
                dk, dv = _kv_loop(dk, dv, k_s, v_s, q_s, do_s, l_s, d_s, Q, DO, LSE, DELTA, TOK, 0, start, n_lo,
                                  gl.minimum(n_lo + BN, blen), offs_n, h, stride_qt, stride_qh, stride_lt, qk_scale,
                                  BM, D, False, True, LD, MMA_S, A_OP)
                dk, dv = _kv_loop(dk, dv, k_s, v_s, q_s, do_s, l_s, d_s, Q, DO, LSE, DELTA, TOK, 0, start, n_lo + BN,
                                  blen, offs_n, h, stride_qt, stride_qh, stride_lt, qk_scale, BM, D, False, False, LD,
                                  MMA_S, A_OP)
            # all slots of (h, g) are one contiguous run of the sorted entries
            lo = gl.load(SEG_START + (h * NBT + g) * KS)
            hi = gl.load(SEG_START + (h * NBT + g) * KS + KS)
            dk, dv = _kv_loop(dk, dv, k_s, v_s, q_s, do_s, l_s, d_s, Q, DO, LSE, DELTA, TOK, lo, 0, 0, hi - lo, offs_n,
                              h, stride_qt, stride_qh, stride_lt, qk_scale, BM, D, True, False, LD, MMA_S, A_OP)
        on = n_lo + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA_D))
        od = gl.arange(0, D, layout=gl.SliceLayout(0, MMA_D))
        op = (start + on)[:, None] * stride_kt + hk * stride_kh + od[None, :]
        omask = (on < blen)[:, None] & (od < D)[None, :]
        gl.store(DK + op, (dk * sm_scale).to(gl.bfloat16), mask=omask)
        gl.store(DV + op, dv.to(gl.bfloat16), mask=omask)


def supported(q: torch.Tensor, k: torch.Tensor, tok: torch.Tensor) -> bool:
    """Whether the Gluon dK/dV applies: a Hopper GPU (wgmma is sm_90 only), bf16, head dim 64 or 128
    (the shapes checked on the GPU), offsets that fit in int32."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9 and q.dtype == torch.bfloat16
            and q.shape[-1] in (64, 128) and max(q.numel(), k.numel(), tok.numel()) <= 2**31)


def dkdv(q, k, v, dout, lse2, delta, plan, tok, bounds, qk_scale, sm_scale, own: bool = True):
    """dk, dv (as moba_backward._backward's Triton kernel computes them; own: with the own-block queries)."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    NKT = _cdiv(plan["B"], BN)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _dkdv_gluon_kernel[(plan["NBT"] * NKT, Hkv)](
        q, k, v, dout, lse2, delta, dk, dv, tok, bounds, plan["blk_start"], plan["blk_len"], plan["NBT"], NKT,
        plan["KS"], qk_scale, sm_scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse2.stride(0), H // Hkv,
        D=D, BM=BM, BN=BN, TPW_D=D // 8, OWN=own, num_warps=NUM_WARPS)
    return dk, dv
