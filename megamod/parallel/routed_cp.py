"""Mixture-of-Depths routed blocks under context parallelism (model/mod.py; DESIGN.md, "MoD").

A routed block takes the top k of each routing window (``mod.window`` W; 0 = the whole sequence).
Under CP a rank holds the zigzag chunks r and 2cp − 1 − r of every sequence (context.py):

- window mode (``mod.cp_balance window``, W dividing the chunk S/(2cp)): a rank's tokens are whole
  windows, so it routes them itself, with no communication, and every rank processes the same
  number of tokens by construction. The routed tokens of a sequence, compacted in order, are again
  zigzag-sharded (each chunk contributes the same number), so the block's inner attention is the
  ordinary CP attention over the compacted sequence (cp_attention.ContextParallelAttention, dense
  or MoBA). Nothing here changes for learned routing: the model's own top-k per window is it.
- global mode (``mod.cp_balance global``, W = S): the exact per-sequence top k from all-gathered
  router logits (S floats a sequence, never activations). A rank processes its own selected
  tokens, padded to a fixed cap ceil(k/cp · (1 + cp_slack)) so shapes stay static; selected tokens
  beyond the cap (the lowest scores first) ride the residual and are counted (``cp_overflow``).
  They attend across ranks by original position (cp_attention.RoutedTokensCPAttention).

Random routing draws the whole sequence's scores on every rank (the default RNG stream is equal on
all of them) and keeps its zigzag slice, so it routes exactly as one device does.

Aux losses: the router BCE and predictor losses are means over the rank's tokens; the trainer
scales their injected gradient by 1/cp as it scales the LM loss (DeepSpeed sums CP gradients).

``apply_routed_cp`` swaps each routed block's class for a subclass with these seams (as
routed_sp.py does for SP, whose seams it composes with); names and parameters are unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megamod.model.mod import RoutedBlock, capacity_tokens, topk_positions
from megamod.parallel.cp_attention import RoutedTokensCPAttention
from megamod.parallel.cp_comm import CPComm, shard_sequence, zigzag_positions


class _ContextParallelRouting:
    """Mixin before a RoutedBlock class (or its SP subclass) in the MRO."""

    cp_comm: CPComm
    cp_seq_len: int  # the whole sequence, S
    cp_global: bool
    cp_slack: float

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is not None:
            return super().scores(x)
        full = torch.randn(x.shape[0], self.cp_seq_len, 1, device=x.device)  # what one device draws
        return shard_sequence(full, self.cp_comm.size, self.cp_comm.rank)

    def select(self, scores: torch.Tensor):
        if not self.cp_global:
            return super().select(scores)
        comm = self.cp_comm
        r = scores[..., 0]
        full = comm.all_gather(r.detach().unsqueeze(-1), "router_logits")[..., 0]  # (B, S) global order
        k = capacity_tokens(self.capacity, full.shape[1])
        member = torch.zeros_like(full).scatter_(1, topk_positions(full, k), 1.0)
        member = shard_sequence(member, comm.size, comm.rank)  # (B, S/cp) this rank's share of the top k
        cap = min(r.shape[1], math.ceil(k / comm.size * (1 + self.cp_slack)))
        # the rank's selected tokens by score (ties: lower position), at most cap of them, then in order
        key = torch.where(member > 0, r.detach(), float("-inf"))
        idx = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :cap].sort(dim=1).values  # (B, cap)
        valid = member.gather(1, idx) > 0  # padding rows (non-members) are not processed
        self._count_overflow((member.sum(1) - cap).clamp(min=0).sum(), cap * r.shape[0])
        inner = self.attention.inner
        positions = zigzag_positions(self.cp_seq_len, comm.size, comm.rank, device=r.device)[idx]
        inner.rows = (positions, valid)  # the attention among routed tokens goes by position
        return idx, valid, member

    @torch.compiler.disable
    def _count_overflow(self, overflow: torch.Tensor, cap: int) -> None:
        if torch._C._current_graph_task_id() != -1 or not self.training:
            return  # not the recomputation of activation checkpointing, not evaluation
        vec = torch.stack([overflow.float(), overflow.new_ones((), dtype=torch.float32)])
        prev = getattr(self, "_cp_stats", None)
        self._cp_stats = vec if prev is None else prev + vec
        self._cp_cap = cap

    def log_metrics(self) -> dict[str, float]:
        """The block's MoD statistics, and in global mode the selected tokens per micro-batch that
        exceeded this rank's cap (cp_overflow) and the cap itself (padded rows per micro-batch)."""
        out = super().log_metrics()
        vec = getattr(self, "_cp_stats", None)
        if vec is not None:
            overflow, n = vec.tolist()
            out.update(cp_overflow=overflow / n, cp_cap=float(self._cp_cap))
            self._cp_stats = None
        return out


def apply_routed_cp(model: nn.Module, comm_for, seq_len: int, cp_balance: str, slack: float) -> None:
    """Give every routed block the CP seams; in global mode its inner attention becomes
    RoutedTokensCPAttention. ``comm_for()``: a new CPComm of this rank (one per layer, so bytes
    are counted per layer)."""
    for module in model.modules():
        if isinstance(module, RoutedBlock) and not isinstance(module, _ContextParallelRouting):
            cls = type(module)
            module.__class__ = type(f"ContextParallel{cls.__name__}", (_ContextParallelRouting, cls), {})
            module.cp_comm, module.cp_seq_len = comm_for(), seq_len
            module.cp_global, module.cp_slack = cp_balance == "global", slack
            if module.cp_global:
                module.attention.inner = RoutedTokensCPAttention(module.cp_comm)
