"""MoBA in two exact pieces, for context parallelism (megamod/parallel/cp_attention.py).

A query's MoBA attention is a softmax over its own block (causal) and the past blocks it picked.
Under context parallelism a rank holds chunks of a sequence whose picked blocks may sit on other
ranks, so the attention is computed as two pieces merged by log-sum-exp:

  own     each local chunk as a sequence of its own, topk 1: block-diagonal causal attention.
          Exact because CP chunks are whole numbers of blocks.
  blocks  every query against the complete blocks it picked, given explicitly: ``sel`` [T, H, KS]
          ids into a block table ``blk_start`` (the first row of each block in k, v), -1 = none.
          k, v can be anything that holds those blocks (all-gathered K, or fetched blocks).

Each piece has a forward, (o fp32, lse fp32 natural log, state), and a backward that takes the
*merged* output and log-sum-exp of the whole attention (as ring attention does): with the final
(O, L), a piece's exact gradient is dS = P ∘ (dP − rowsum(dO ∘ O)) with P = exp(S − L), so no
piece needs the gradient of its own lse and nothing merges twice. Rows of the blocks piece with
no pick have o = 0 and lse = −inf.

On CUDA the pieces run megamod's Triton MoBA kernels (moba_pieces_triton.py); elsewhere torch
(the block-gather code of moba.py), whose backward recomputes the piece under autograd and
differentiates the surrogate Σ dO·(w·o) − Σ delta·w with w = exp(lse − L), which has exactly that
gradient. Shapes: T queries, Tk key rows, H / Hkv heads, D head dim, B block size, KS = topk − 1.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from megamod.ops.moba import _block_layout, _block_means, _past_blocks, moba_attn_varlen_gather, select_blocks_at

__all__ = ["block_means", "moba_gate_at", "moba_own_forward", "moba_own_backward", "moba_blocks_forward",
           "moba_blocks_backward", "merge_pieces"]


def _triton():
    from megamod.ops import moba_pieces_triton  # lazy: importing megamod.ops never imports triton

    return moba_pieces_triton


@torch.no_grad()
def block_means(k: Tensor, cu_seqlens: Tensor, chunk: int) -> Tensor:
    """[NB, Hkv, D] fp32 mean of every block of the runs in cu_seqlens (blocks restart at each run),
    computed as the single-device gate computes them."""
    if k.is_cuda:
        return _triton().block_means(k, cu_seqlens, chunk)
    return _block_means(k, _block_layout(cu_seqlens, chunk, k.device))


@torch.no_grad()
def moba_gate_at(q: Tensor, means: Tensor, cu_seqlens: Tensor, pos0: Tensor, blk_first: Tensor, chunk: int,
                 topk: int) -> Tensor:
    """[T, H, KS] int32 picks, ids into ``means`` (-1 = none), of runs of queries at positions
    pos0[n] + i of their sequences, whose blocks are means[blk_first[n]:] (moba.select_blocks_at
    has the rule). A row with p picks holds them in its last p slots."""
    if q.is_cuda:
        return _triton().gate_at(q, means, cu_seqlens, pos0, blk_first, chunk, topk)
    sel = select_blocks_at(q, means, cu_seqlens, pos0, blk_first, chunk, topk)
    return sel.sort(-1).values.to(torch.int32)  # -1 first: picks in the last slots, as the GPU gate


def merge_pieces(pieces: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Exact softmax merge of (o [.., D] fp32, lse [..] fp32) pieces over disjoint key sets."""
    lse = torch.logsumexp(torch.stack([p[1] for p in pieces]), dim=0)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)  # rows every piece left empty stay 0
    out = sum(torch.exp(l - safe).unsqueeze(-1) * o for o, l in pieces)
    return out, lse


# ---- own piece ------------------------------------------------------------------------------


def moba_own_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     chunk: int) -> tuple[Tensor, Tensor, Any]:
    """Causal attention inside each block of each run: q, k, v [T, heads, D] on the same rows."""
    if q.is_cuda:
        return _triton().own_forward(q, k, v, cu_seqlens, max_seqlen, chunk)
    fwd = _own_torch(cu_seqlens, max_seqlen, chunk)
    with torch.no_grad():
        o, lse = fwd(q, k, v)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o.to(cdt), lse.to(cdt), (fwd, q, k, v)


def moba_own_backward(do: Tensor, out: Tensor, lse: Tensor, state: Any) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(state, dict):
        return _triton().own_backward(do, out, lse, state)
    fwd, *inputs = state
    return _surrogate_backward(fwd, inputs, do, out, lse)


def _own_torch(cu_seqlens: Tensor, max_seqlen: int, chunk: int) -> Callable:
    def fwd(q, k, v):
        return moba_attn_varlen_gather(q, k, v, cu_seqlens, max_seqlen, chunk, 1, return_lse=True)

    return fwd


# ---- blocks piece ---------------------------------------------------------------------------


def moba_blocks_forward(q: Tensor, k: Tensor, v: Tensor, blk_start: Tensor, sel: Tensor,
                        chunk: int) -> tuple[Tensor, Tensor, Any]:
    """q [T, H, D] against the blocks it picked: sel [T, H, KS] ids into blk_start [NB] (rows of
    k, v [Tk, Hkv, D] where each block's B keys start), -1 = none."""
    if q.is_cuda:
        return _triton().blocks_forward(q, k, v, blk_start, sel, chunk)
    fwd = _blocks_torch(blk_start, sel, chunk)
    with torch.no_grad():
        o, lse = fwd(q, k, v)
    return o, lse, (fwd, q, k, v)


def moba_blocks_backward(do: Tensor, out: Tensor, lse: Tensor, state: Any) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(state, dict):
        return _triton().blocks_backward(do, out, lse, state)
    fwd, *inputs = state
    return _surrogate_backward(fwd, inputs, do, out, lse)


def _blocks_torch(blk_start: Tensor, sel: Tensor, chunk: int) -> Callable:
    def fwd(q, k, v):
        T, H, D = q.shape
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
        o = torch.zeros(T, H, D, dtype=cdt, device=q.device)
        lse = torch.full((T, H), float("-inf"), dtype=cdt, device=q.device)
        t_idx, h_idx, s_idx = torch.nonzero(sel >= 0, as_tuple=True)
        if t_idx.numel() == 0:
            return o, lse
        g_idx = sel[t_idx, h_idx, s_idx].long()
        lay = {"blk_start": blk_start.to(device=q.device, dtype=torch.long), "NB": blk_start.numel()}
        m_e, l_e, o_e = _past_blocks(qf, kf, vf, lay, t_idx, h_idx, g_idx, chunk, H // k.shape[1], D**-0.5)
        row = t_idx * H + h_idx  # [E] flat (t, h)
        m = torch.full((T * H,), float("-inf"), dtype=cdt, device=q.device)
        m = m.scatter_reduce(0, row, m_e.detach(), "amax")
        w = torch.exp(m_e - m[row])
        l_sum = torch.zeros(T * H, dtype=cdt, device=q.device).index_add(0, row, l_e * w)
        o_sum = o.view(T * H, D).index_add(0, row, o_e * w[:, None])
        has = l_sum > 0
        l_safe = torch.where(has, l_sum, 1.0)  # no 0/0 (nor its gradient) in rows without picks
        o = (o_sum / l_safe[:, None]).view(T, H, D)
        lse = torch.where(has, torch.where(has, m, 0.0) + torch.log(l_safe), float("-inf")).view(T, H)
        return o, lse

    return fwd


# ---- the backward of a piece from the merged output (torch) ---------------------------------


def _surrogate_backward(fwd: Callable, inputs: list[Tensor], do: Tensor, out: Tensor,
                        lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The piece's share of the gradient, given the whole attention's output and lse: the gradient
    of Σ dO·(w·o) − Σ delta·w, w = exp(lse_piece − lse), delta = rowsum(dO ∘ O), with (dO, O, lse)
    held constant (module docstring)."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_() for x in inputs]
        o, lse_p = fwd(*xs)
        safe = torch.where(torch.isfinite(lse), lse, 0.0)
        w = torch.exp(lse_p.to(o.dtype) - safe.to(o.dtype))  # [T, H]; 0 where the piece has no keys
        delta = (do.to(o.dtype) * out.to(o.dtype)).sum(-1)
        surrogate = (do.to(o.dtype) * (w.unsqueeze(-1) * o)).sum() - (delta * w).sum()
        grads = torch.autograd.grad(surrogate, xs, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g.to(x.dtype) for x, g in zip(inputs, grads))
