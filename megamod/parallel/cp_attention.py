"""Context-parallel attention behind the inner-attention seam: dense causal and MoBA, exact.

Shapes per rank: q (B, S/cp, H, D), k/v (B, S/cp, Hkv, D) in the zigzag order of cp_comm.py (local
chunks a = r and b = 2·cp − 1 − r of c = S/(2·cp) tokens), H/tp and Hkv/tp under TP.

Algorithm: all-gather of K/V, chosen for both kinds (README, "Context parallelism", has the
numbers). Only the Hkv heads travel; heads are repeated after the transfer. Each local chunk's
attention is cut into exact pieces over disjoint key sets, merged by log-sum-exp:

  dense   diagonal: the chunk against its own keys, causal;  prefix: against every key before
          the chunk (the gathered K), no mask. Pairs per rank: c·(S − c)·... equal on every rank
          by the zigzag (rank r's early and late chunk together always see 2cp − 1 chunks + 1).
  MoBA    own: causal inside each block of the chunk (local);  blocks: the top (topk − 1)
          complete past blocks by q·mean(K_block), chosen by *global* position from the
          all-gathered block means (n_blocks × Hkv × D fp32: KiB), against the gathered K/V.
          The picks are the single-device gate's (same means, same rule).

Backward, as ring attention's: every piece's gradient from the merged output and lse
(megamod/ops/moba_pieces.py's docstring); the gathered keys' gradients go back to their owners
by reduce-scatter, summed with the local ones. Forward and backward move, per layer and rank,
(cp − 1)/cp of the whole sequence's K and V once each way (cp_comm.CPComm counts it).
"""

from __future__ import annotations

import torch
from torch import nn

from megamod.compat import attention_backward, attention_forward
from megamod.ops.moba_pieces import (block_means, merge_pieces, moba_blocks_backward, moba_blocks_forward,
                                     moba_gate_at, moba_own_backward, moba_own_forward)
from megamod.parallel.cp_comm import CPComm, local_chunks


def _repeat(x: torch.Tensor, g: int) -> torch.Tensor:
    """(B, L, Hkv, D) -> (B, H, L, D): GQA heads repeated after the transfer, never before."""
    return (x.repeat_interleave(g, dim=2) if g > 1 else x).transpose(1, 2)


def _unrepeat(dx: torch.Tensor, g: int) -> torch.Tensor:
    """(B, H, L, D) gradient -> (B, L, Hkv, D), summed over each GQA group."""
    b, h, n, d = dx.shape
    return dx.transpose(1, 2).reshape(b, n, h // g, g, d).sum(3)


class _DenseCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: CPComm, stats: dict):
        b, s_loc, h, d = q.shape
        g = h // k.shape[2]
        c = s_loc // 2
        k_all, v_all = comm.all_gather(k, "k"), comm.all_gather(v, "v")  # (B, S, Hkv, D) global order
        qt = q.transpose(1, 2)  # (B, H, S/cp, D)
        outs, lses, pieces = [], [], []
        for j, chunk in enumerate(local_chunks(comm.size, comm.rank)):
            qj = qt[:, :, j * c:(j + 1) * c]
            parts = [("diag", *attention_forward(qj, _repeat(k[:, j * c:(j + 1) * c], g),
                                                 _repeat(v[:, j * c:(j + 1) * c], g), True))]
            if chunk > 0:  # every key before the chunk, none masked
                parts.append(("prefix", *attention_forward(qj, _repeat(k_all[:, :chunk * c], g),
                                                           _repeat(v_all[:, :chunk * c], g), False)))
            o, lse = merge_pieces([(p[1].float(), p[2]) for p in parts])
            outs.append(o)
            lses.append(lse)
            pieces.append([(name, state) for name, _, _, state in parts])
        out = torch.cat(outs, dim=2)  # (B, H, S/cp, D) fp32
        lse = torch.cat(lses, dim=2)
        # query-key pairs this rank attends, per head: the causal count of its positions
        pos = torch.cat([torch.arange(ch * c, (ch + 1) * c) for ch in local_chunks(comm.size, comm.rank)])
        if stats is not None:
            stats["work"] = stats.get("work", 0.0) + float(b * h * (pos + 1).sum())
        ctx.comm, ctx.pieces, ctx.g, ctx.c = comm, pieces, g, c
        ctx.save_for_backward(k, v, out, lse)
        ctx.k_shape = k_all.shape
        return out.transpose(1, 2).to(q.dtype), lse.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout, _dlse):
        k, v, out, lse = ctx.saved_tensors
        comm, g, c = ctx.comm, ctx.g, ctx.c
        do = dout.transpose(1, 2)  # (B, H, S/cp, D)
        dq = torch.zeros_like(do, dtype=torch.float32)
        dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
        dk_all = torch.zeros(ctx.k_shape, dtype=torch.float32, device=k.device)
        dv_all = torch.zeros_like(dk_all)
        for j, (chunk, parts) in enumerate(zip(local_chunks(comm.size, comm.rank), ctx.pieces)):
            rows = slice(j * c, (j + 1) * c)
            for name, state in parts:
                gq, gk, gv = attention_backward(do[:, :, rows], out[:, :, rows], lse[:, :, rows], state)
                dq[:, :, rows] += gq
                if name == "diag":
                    dk[:, rows] += _unrepeat(gk, g)
                    dv[:, rows] += _unrepeat(gv, g)
                else:
                    dk_all[:, :chunk * c] += _unrepeat(gk, g)
                    dv_all[:, :chunk * c] += _unrepeat(gv, g)
        dk += comm.reduce_scatter(dk_all.to(k.dtype), "dk")
        dv += comm.reduce_scatter(dv_all.to(v.dtype), "dv")
        ctx.pieces = None
        return dq.transpose(1, 2).to(k.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class _MobaCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: CPComm, chunk: int, topk: int, stats: dict):
        b, s_loc, h, d = q.shape
        hkv = k.shape[2]
        c = s_loc // 2
        s = comm.size * s_loc
        nbs = s // chunk  # blocks of a whole sample
        dev = q.device
        qf, kf, vf = (x.reshape(b * s_loc, *x.shape[2:]) for x in (q, k, v))  # runs: sample-major, 2 per sample
        cu = torch.arange(0, b * s_loc + 1, c, dtype=torch.int32, device=dev)
        starts = [ch * c for ch in local_chunks(comm.size, comm.rank)]
        pos0 = torch.tensor(starts * b, dtype=torch.int32, device=dev)  # global position of each run's first token
        blk_first = torch.arange(b, dtype=torch.int32, device=dev).repeat_interleave(2) * nbs
        # block means of the local blocks, all-gathered in global order: (B·NBs, Hkv, D) fp32
        means = block_means(kf, cu, chunk).view(b, s_loc // chunk, hkv, d)
        means = comm.all_gather(means, "means").reshape(b * nbs, hkv, d)
        sel = moba_gate_at(qf, means, cu, pos0, blk_first, chunk, topk)  # [T, H, KS] ids of global blocks
        k_all = comm.all_gather(k, "k").reshape(b * s, hkv, d)  # (B·S, Hkv, D), block i of sample j at
        v_all = comm.all_gather(v, "v").reshape(b * s, hkv, d)  # rows (j·NBs + i)·chunk
        blk_start = torch.arange(b * nbs, dtype=torch.int32, device=dev) * chunk
        o1, l1, own = moba_own_forward(qf, kf, vf, cu, c, chunk)
        o2, l2, picked = moba_blocks_forward(qf, k_all, v_all, blk_start, sel, chunk)
        out, lse = merge_pieces([(o1, l1), (o2, l2)])
        if stats is not None:
            _moba_stats(stats, sel, starts, c, chunk, b, h, comm)
        ctx.comm, ctx.pieces, ctx.shape = comm, (own, picked), (b, s_loc, s)
        ctx.save_for_backward(out, lse)
        return out.view(b, s_loc, h, d).to(q.dtype), lse.view(b, s_loc, h)

    @staticmethod
    def backward(ctx, dout, _dlse):
        out, lse = ctx.saved_tensors
        (own, picked), (b, s_loc, s) = ctx.pieces, ctx.shape
        do = dout.reshape(out.shape)
        dq, dk, dv = moba_own_backward(do, out, lse, own)
        dq2, dk_all, dv_all = moba_blocks_backward(do, out, lse, picked)
        hkv, d = dk.shape[1:]
        dk = dk + ctx.comm.reduce_scatter(dk_all.view(b, s, hkv, d), "dk").reshape(dk.shape)
        dv = dv + ctx.comm.reduce_scatter(dv_all.view(b, s, hkv, d), "dv").reshape(dv.shape)
        ctx.pieces = None
        shape = (b, s_loc, -1, d)
        return (dq + dq2).view(shape), dk.view(shape), dv.view(shape), None, None, None, None


@torch.no_grad()
def _moba_stats(stats: dict, sel: torch.Tensor, starts: list[int], c: int, chunk: int, b: int, h: int,
                comm: CPComm) -> None:
    """Per-rank attention work (query-key pairs: causal inside the own block + chunk keys per pick)
    and U, the distinct remote blocks this rank's queries picked (device tensors, no host sync)."""
    own_pairs = sum(((torch.arange(st, st + c) % chunk) + 1).sum().item() for st in starts) * b * h
    picks = (sel >= 0).sum() * chunk
    nblk = b * comm.size * 2 * c // chunk
    hit = torch.zeros(nblk + 1, dtype=torch.bool, device=sel.device)
    hit[torch.where(sel >= 0, sel.long(), nblk).flatten()] = True
    local = torch.zeros(nblk + 1, dtype=torch.bool, device=sel.device)
    per = 2 * c * comm.size // chunk  # blocks per sample
    for j in range(b):
        for st in starts:
            local[j * per + st // chunk: j * per + (st + c) // chunk] = True
    remote = hit[:nblk] & ~local[:nblk]
    for key, val in (("work", picks.float() + own_pairs), ("remote_blocks", remote.sum().float()),
                     ("remote_total", (~local[:nblk]).sum().float())):
        stats[key] = stats[key] + val if key in stats else val


class ContextParallelAttention(nn.Module):
    """The inner attention of one block under CP: dense causal (SDPAttention) or MoBA
    (MobaAttention), by the kind it wraps; same interface, q (B, S/cp, H, D), k/v (B, S/cp, Hkv, D).

    log_metrics (the trainer's logging hook): per training micro-batch (forward and backward), the bytes this rank sent and
    received per collective (cp_bytes_k/v: forward all-gathers, dk/dv: backward reduce-scatters,
    means: MoBA's block means), its attention work (query-key pairs, cp_work; the trainer also
    reports its max over ranks) and for MoBA U, the distinct remote blocks its queries picked."""

    def __init__(self, inner: nn.Module, comm: CPComm) -> None:
        super().__init__()
        self.inner, self.comm = inner, comm
        self.moba = hasattr(inner, "chunk_size")
        self._stats: dict = {}
        self._forwards = 0

    def extra_repr(self) -> str:
        return f"cp={self.comm.size}, rank={self.comm.rank}, algorithm=all-gather"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.forward_with_lse(q, k, v)[0]

    @torch.compiler.disable  # collectives inside an autograd.Function: run eagerly
    def forward_with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """(out (B, S/cp, H, D), lse (B, S/cp, H) fp32). Statistics count training forwards only,
        and not their recomputation under activation checkpointing (which runs inside backward);
        the bytes count everything that moved."""
        stats = None
        if self.training and torch._C._current_graph_task_id() == -1:
            self._forwards += 1
            stats = self._stats
        if self.moba:
            return _MobaCP.apply(q, k, v, self.comm, self.inner.chunk_size, self.inner.topk, stats)
        return _DenseCP.apply(q, k, v, self.comm, stats)

    def log_metrics(self) -> dict[str, float]:
        n = max(1, self._forwards)
        out = {f"cp_bytes_{k}": v / n for k, v in self.comm.take_bytes().items()}
        stats, self._stats = self._stats, {}
        for key, val in stats.items():
            out[f"cp_{key}"] = float(val) / n
        self._forwards = 0
        return out


# ---------------------------------------------------------------------------------------------
# Attention among a routed block's tokens when they are spread unevenly over the CP ranks
# (Mixture-of-Depths' global mode, routed_cp.py): by explicit positions
# ---------------------------------------------------------------------------------------------


class _GatherRanks(torch.autograd.Function):
    """CPComm.gather_ranks with its backward (the gathered rows' gradients summed back to their rank)."""

    @staticmethod
    def forward(ctx, x, comm: CPComm, name: str):
        ctx.comm, ctx.name = comm, name
        return comm.gather_ranks(x, name)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.scatter_ranks(grad, "d" + ctx.name), None, None


class RoutedTokensCPAttention(nn.Module):
    """Dense causal attention among tokens held at arbitrary positions on the CP ranks: q (B, n, H, D),
    k/v (B, n, Hkv, D) of this rank's n rows, whose global positions and validity (padding rows
    are invalid) the routed block sets in ``rows`` before each forward. Keys and values of every
    rank's rows are all-gathered (Hkv heads only); a query sees the valid keys at positions <= its
    own. Padding queries see every key (their outputs are discarded), so no softmax row is empty."""

    def __init__(self, comm: CPComm) -> None:
        super().__init__()
        self.comm = comm
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"cp={self.comm.size}, rank={self.comm.rank}, routed tokens by position"

    @torch.compiler.disable
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        pos, valid = self.rows  # (B, n) each
        k_all, v_all = _GatherRanks.apply(k, self.comm, "k"), _GatherRanks.apply(v, self.comm, "v")
        pos_all = self.comm.gather_ranks(pos, "positions")
        valid_all = self.comm.gather_ranks(valid, "valid")
        mask = (pos_all[:, None, :] <= pos[:, :, None]) & valid_all[:, None, :]  # (B, n, cp·n)
        mask = mask | ~valid[:, :, None]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                           attn_mask=mask[:, None], enable_gqa=k.shape[2] != q.shape[2])
        return o.transpose(1, 2)

    def log_metrics(self) -> dict[str, float]:
        return {f"cp_bytes_{k}": v for k, v in self.comm.take_bytes().items()}
