"""PROBE: MoBA dK/dV in Gluon (Hopper): explicit asynchronous wgmma schedule, cp.async double buffer of
the gathered q/dO rows. Same contract as megamod.ops.moba_backward._dkdv_kernel (bf16, D = BLOCK_D,
int32 row offsets)."""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma, warpgroup_mma_init,
                                                               warpgroup_mma_wait)


@gluon.jit
def _issue_rows(q_buf, do_buf, Q, DO, TOK, tok0, row0, m0, m_hi, h, stride_qt, stride_qh,
                BM: gl.constexpr, D: gl.constexpr, GATHER: gl.constexpr, LD: gl.constexpr):
    m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, LD))
    mc = gl.minimum(m, m_hi - 1)
    if GATHER:
        rows = gl.load(TOK + tok0 + mc)
    else:
        rows = row0 + mc
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
    qp = rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    async_copy.async_copy_global_to_shared(q_buf, Q + qp)
    async_copy.async_copy_global_to_shared(do_buf, DO + qp)


@gluon.jit
def _kv_loop(dk, dv, k_s, v_s, q_s, do_s, Q, DO, LSE, DELTA, TOK, tok0, row0, m_lo, m_hi, offs_n, h, stride_qt,
             stride_qh, stride_lt, qk_scale, BM: gl.constexpr, D: gl.constexpr, GATHER: gl.constexpr,
             CAUSAL: gl.constexpr, LD: gl.constexpr, MMA_S: gl.constexpr, A_OP: gl.constexpr, STAGES: gl.constexpr):
    n_it = gl.cdiv(m_hi - m_lo, BM)
    if n_it > 0:
        BN: gl.constexpr = offs_n.shape[0]
        for j in gl.static_range(STAGES - 1):  # prologue: the first STAGES - 1 row tiles (empty groups past the end)
            if j < n_it:
                _issue_rows(q_s.index(j), do_s.index(j), Q, DO, TOK, tok0, row0, m_lo + j * BM, m_hi, h, stride_qt,
                            stride_qh, BM, D, GATHER, LD)
            async_copy.commit_group()
        # the register operands of the previous step's dV/dK products stay alive until those finish
        p_op = gl.zeros([BN, BM], gl.bfloat16, A_OP)
        ds_op = gl.zeros([BN, BM], gl.bfloat16, A_OP)
        dk = warpgroup_mma_init(dk)
        dv = warpgroup_mma_init(dv)
        for it in range(n_it):
            slot = it % STAGES
            m0 = m_lo + it * BM
            async_copy.wait_group(STAGES - 2)
            gl.thread_barrier()
            fence_async_shared()
            q_buf = q_s.index(slot)
            do_buf = do_s.index(slot)
            zero = gl.zeros([BN, BM], gl.float32, MMA_S)
            s = warpgroup_mma(k_s, q_buf.permute((1, 0)), zero, use_acc=False, is_async=True)
            dp = warpgroup_mma(v_s, do_buf.permute((1, 0)), zero, use_acc=False, is_async=True)
            # S done (and, in order, the previous step's dV/dK: the other slot is free); dP in flight
            s, dk, dv, p_op, ds_op = warpgroup_mma_wait(1, deps=(s, dk, dv, p_op, ds_op))
            nxt = it + STAGES - 1  # into the slot the previous step read (its products are done)
            if nxt < n_it:
                _issue_rows(q_s.index(nxt % STAGES), do_s.index(nxt % STAGES), Q, DO, TOK, tok0, row0, m_lo + nxt * BM,
                            m_hi, h, stride_qt, stride_qh, BM, D, GATHER, LD)
            async_copy.commit_group()
            m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, MMA_S))
            mc = gl.minimum(m, m_hi - 1)
            if GATHER:
                rows = gl.load(TOK + tok0 + mc)
            else:
                rows = row0 + mc
            lse2 = gl.where(m < m_hi, gl.load(LSE + rows * stride_lt + h), float("inf"))
            delta = gl.load(DELTA + rows * stride_lt + h)
            pT = gl.exp2(s * qk_scale - lse2[None, :])
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
def _dkdv_gl_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TOK, SEG_START, BLK_START, BLK_LEN, NBT, NKT, KS, qk_scale,
                    sm_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, G, D: gl.constexpr,
                    BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    pid = gl.program_id(0)
    g = pid // NKT
    n_lo = (pid % NKT) * BN
    hk = gl.program_id(1)
    blen = gl.load(BLK_LEN + g)
    if n_lo < blen:
        start = gl.load(BLK_START + g)
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
        MMA_S: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BM, 16])
        MMA_D: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, D, 16])
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA_D, k_width=2)
        KV_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], gl.bfloat16)
        Q_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16)
        k_s = gl.allocate_shared_memory(gl.bfloat16, [BN, D], KV_SL)
        v_s = gl.allocate_shared_memory(gl.bfloat16, [BN, D], KV_SL)
        q_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, D], Q_SL)
        do_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, D], Q_SL)
        kn = n_lo + gl.arange(0, BN, layout=gl.SliceLayout(1, LD))
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
        kp = (start + gl.minimum(kn, blen - 1))[:, None] * stride_kt + hk * stride_kh + offs_d[None, :]
        async_copy.async_copy_global_to_shared(k_s, K + kp)
        async_copy.async_copy_global_to_shared(v_s, V + kp)
        async_copy.commit_group()
        offs_n = n_lo + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA_S))
        dk = gl.zeros([BN, D], gl.float32, MMA_D)
        dv = gl.zeros([BN, D], gl.float32, MMA_D)
        for hh in range(G):
            h = hk * G + hh
            dk, dv = _kv_loop(dk, dv, k_s, v_s, q_s, do_s, Q, DO, LSE, DELTA, TOK, 0, start, n_lo,
                              gl.minimum(n_lo + BN, blen), offs_n, h, stride_qt, stride_qh, stride_lt, qk_scale,
                              BM, D, False, True, LD, MMA_S, A_OP, STAGES)
            dk, dv = _kv_loop(dk, dv, k_s, v_s, q_s, do_s, Q, DO, LSE, DELTA, TOK, 0, start, n_lo + BN, blen,
                              offs_n, h, stride_qt, stride_qh, stride_lt, qk_scale, BM, D, False, False, LD, MMA_S,
                              A_OP, STAGES)
            lo = gl.load(SEG_START + (h * NBT + g) * KS)
            hi = gl.load(SEG_START + (h * NBT + g) * KS + KS)
            dk, dv = _kv_loop(dk, dv, k_s, v_s, q_s, do_s, Q, DO, LSE, DELTA, TOK, lo, 0, 0, hi - lo, offs_n, h,
                              stride_qt, stride_qh, stride_lt, qk_scale, BM, D, True, False, LD, MMA_S, A_OP, STAGES)
        on = n_lo + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA_D))
        od = gl.arange(0, D, layout=gl.SliceLayout(0, MMA_D))
        op = (start + on)[:, None] * stride_kt + hk * stride_kh + od[None, :]
        omask = (on < blen)[:, None] & (od < D)[None, :]
        gl.store(DK + op, (dk * sm_scale).to(gl.bfloat16), mask=omask)
        gl.store(DV + op, dv.to(gl.bfloat16), mask=omask)


def dkdv_gluon(q, k, v, dout, lse2, delta, plan, BM=64, BN=128, num_warps=8, STAGES=2):
    """dk, dv as moba_backward._backward computes them (bf16, D a power of two)."""
    import torch
    from megamod.ops.moba_plan import LOG2E, _cdiv
    T, H, D = q.shape
    Hkv = k.shape[1]
    B, KS, NBT = plan["B"], plan["KS"], plan["NBT"]
    sm_scale = D**-0.5
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    NKT = _cdiv(B, BN)
    tok, bounds = (plan["tok"], plan["seg_bounds"]) if KS > 0 else (plan["blk_len"], plan["blk_len"])
    _dkdv_gl_kernel[(NBT * NKT, Hkv)](
        q, k, v, dout, lse2, delta, dk, dv, tok, bounds, plan["blk_start"], plan["blk_len"], NBT, NKT, KS,
        sm_scale * LOG2E, sm_scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse2.stride(0), H // Hkv,
        D=D, BM=BM, BN=BN, STAGES=STAGES, num_warps=num_warps)
    return dk, dv
