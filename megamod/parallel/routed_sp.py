"""Mixture-of-Depths routed blocks under sequence parallelism (model/mod.py, "Parallelism").

Under SP each TP rank holds S/tp tokens of the residual stream, but a routed block picks its top k
over the whole sequence, and every TP rank must pick the same tokens. What crosses the TP group:

    scores   (B, S/tp, n) -> all-gather S -> (B, S, n)     n = 1 or 2 floats a token, not d
    take     own selected rows into a zero (B, k, d), all-reduce -> (B, k, d) on every rank
    block    attention + MLP over the k tokens as plain TP (copy_to_tp in, all-reduce out)
    put      add the (B, k, d) delta onto the rows this rank owns

So a routed block moves k·d (k = S/8 by default) instead of the S·d a dense SP block gathers, and
selection never sees activations from other ranks. Gradients: the compacted input, the block and
the gate are replicated over TP, so their gradients are whole on every rank; ``put``'s
``copy_to_tp`` all-reduces the per-rank slices of the delta's gradient into that whole one, and
``take``'s ``reduce_from_tp`` passes it back unchanged to each rank's own rows. The logits' gather
keeps each rank's slice of the (whole) gradient, which reaches the router through this rank's
tokens only: the router and predictor gradients are partial sums over the sequence, summed over
TP like the other SP-replicated gains (tensor._sum_replicated_grads_over_tp). The routed block's
own norms act on the replicated compacted tokens: their gradients are whole already and are left
out of that sum (``replicated_compute_params``).

``apply_routed_sp`` swaps the class of each routed block in place (as ``torch.distributed.fsdp
.fully_shard`` swaps a module's class): the three seams change, the parameters and their names do
not, and the model file never learns about SP.
"""

from __future__ import annotations

import torch
from torch import nn

from megamod.model.mod import RoutedBlock
from megamod.parallel.tp_layers import copy_to_tp, gather_seq_replicated, reduce_from_tp


class SequenceParallelRoutedBlock(RoutedBlock):
    tp_group: object
    tp_rank: int

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return gather_seq_replicated(super().scores(x), self.tp_group)  # (B, S/tp, n) -> (B, S, n)

    def _own(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which selected positions idx (B, k) are among this rank's tokens x (B, S/tp, d), and
        their local row (clamped where not: those rows are masked)."""
        s_local = x.shape[1]
        local = idx - self.tp_rank * s_local
        mine = (local >= 0) & (local < s_local)  # (B, k)
        return local.clamp(0, s_local - 1), mine

    def take(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        local, mine = self._own(x, idx)
        rows = super().take(x, local).masked_fill(~mine.unsqueeze(-1), 0.0)  # (B, k, d), own rows only
        return reduce_from_tp(rows, self.tp_group)  # every selected row, on every TP rank

    def put(self, x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor,
            valid: torch.Tensor | None = None) -> torch.Tensor:
        local, mine = self._own(x, idx)
        if valid is not None:
            mine = mine & valid
        delta = copy_to_tp(delta, self.tp_group).masked_fill(~mine.unsqueeze(-1), 0.0)  # (B, k, d)
        return super().put(x, local, delta)  # rows of other ranks (clamped) receive exact zeros

    def replicated_compute_params(self) -> list[nn.Parameter]:
        """Replicated parameters applied to the replicated compacted tokens (whole gradients)."""
        return [*self.attention_norm.parameters(), *self.ffn_norm.parameters()]


def apply_routed_sp(model: nn.Module, group, rank: int) -> set[str]:
    """Give every routed block the SP seams. Returns their module names (``layers.3``), whose
    attention/feed-forward regions the TP pass then enters and leaves as plain TP."""
    names = set()
    for name, module in model.named_modules():
        if type(module) is RoutedBlock:
            module.__class__ = SequenceParallelRoutedBlock
            module.tp_group, module.tp_rank = group, rank
            names.add(name)
    return names
