"""Context parallelism: one sequence over the ``cp`` ranks of a CP group (DESIGN.md, "Context parallelism").

Layout (zigzag). Each sample of S tokens is cut into 2·cp chunks of c = S / (2·cp); CP rank r holds
chunks r and 2·cp − 1 − r, in that order, so every rank has the same causal work (one early chunk,
one late one). Tokens, targets and RoPE positions are sliced once, when a micro-batch enters the
model (``shard_batch``); everything else in the model is token-wise and never learns about CP
except attention, whose inner seam ``apply_cp`` wraps (cp_attention.py).

The loss is the mean over every token of the sequence, summed over the CP group and divided once:
each rank's loss is its local cross-entropy *sum* over B·S (``cp_loss``). DeepSpeed sums the
gradients of replicated parameters over the CP group and averages them over DP (it divides by
the sequence-data-parallel size over cp, the Ulysses convention), which is exactly the gradient of
that mean. ZeRO partitions over dp × cp (``ParallelDims`` hands DeepSpeed that group).

Notation: B batch, S the whole sequence, S/cp = 2·c the tokens a rank holds.
"""

from __future__ import annotations

import torch
from torch import nn

from megamod.parallel.cp_attention import ContextParallelAttention
from megamod.parallel.cp_comm import CPComm, shard_sequence, zigzag_positions  # noqa: F401 (the layout, re-exported)
from megamod.parallel.routed_cp import apply_routed_cp


def shard_batch(batch: torch.Tensor, cp: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A (B, S+1) micro-batch -> this rank's (tokens (B, S/cp), targets (B, S/cp), positions (S/cp,)),
    positions None at cp = 1 (the model numbers tokens 0..S-1 itself)."""
    tokens, targets = batch[:, :-1], batch[:, 1:]
    if cp == 1:
        return tokens, targets, None
    s = tokens.shape[1]
    return (shard_sequence(tokens, cp, rank), shard_sequence(targets, cp, rank),
            zigzag_positions(s, cp, rank, device=batch.device))


def cp_loss(loss_fn, cp: int):
    """The per-rank loss under CP: the local mean over B·S/cp tokens divided by cp is the local
    sum over B·S (every rank holds S/cp tokens of each sample), so the CP group's sum is the mean
    over the whole sequence. Identity at cp = 1."""
    if cp == 1:
        return loss_fn

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, targets) / cp

    return loss


# ---------------------------------------------------------------------------------------------
# apply_cp: wrap the inner-attention seam of every block
# ---------------------------------------------------------------------------------------------


def apply_cp(model: nn.Module, dims, cfg) -> None:
    """Replace every block's inner attention (SDPA or MoBA) by its context-parallel version and give
    Mixture-of-Depths routed blocks their CP seams (routed_cp.py), in place, on the meta device or
    later. No-op at cp = 1. Module and parameter names do not change (the inner attention holds no
    parameters)."""
    if dims.cp == 1:
        return
    for block in model.layers.values():
        attn = block.attention
        attn.inner = ContextParallelAttention(attn.inner, CPComm(dims.group("cp"), dims.coords()["cp"], dims.cp))
    apply_routed_cp(model, lambda: CPComm(dims.group("cp"), dims.coords()["cp"], dims.cp), cfg.train.seq_len,
                    cfg.mod.cp_balance, cfg.mod.cp_slack)
