"""The language-model loss, matched to the output layer's sharding, chosen once (``build_loss_fn``).

    full      logits (B, S, V) -> mean cross-entropy in fp32 (``lm_loss``); under TP the logits stay
              sharded by vocabulary, (B, S, V/tp), and the softmax normaliser is summed over the TP
              group (``vocab_parallel_lm_loss``): the full logits never exist anywhere.
    chunked   ``train.loss_chunk_tokens`` N > 0: the model's output projection is folded into the
              loss, which computes logits and cross-entropy N tokens at a time and recomputes each
              chunk's logits in the backward (activation checkpointing per chunk): at most one
              chunk's (N, V/tp) logits exist at a time, instead of the (B·S, V/tp) ones. At
              S/cp = 131K local tokens and V = 32000 that is 16.8 GB of fp32 logits (plus the bf16
              ones) against 0.26 GB at N = 2048; the price is the output GEMM once more in backward.
              The output module keeps its weight and its name (``output.weight``), so checkpoints
              do not change; its forward returns its input, after its entry hook (TP's copy or
              sequence-parallel gather) ran.

Under context parallelism every variant is this rank's share of the whole sequence's mean
(context.cp_loss).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamod.config import Config
from megamod.parallel.context import cp_loss
from megamod.parallel.dims import ParallelDims
from megamod.parallel.tp_layers import vocab_parallel_cross_entropy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over (B, S), in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def vocab_parallel_lm_loss(logits: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    """``lm_loss`` for logits (B, S, V/tp) sharded by vocabulary over ``group``: same value on
    every TP rank, and the full (B, S, V) logits never exist anywhere."""
    return vocab_parallel_cross_entropy(logits, targets, group).mean()


def token_losses(logits: torch.Tensor, targets: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of logits (N, V) or, with a TP group, (N, V/tp) shards."""
    if group is None:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    return vocab_parallel_cross_entropy(logits, targets, group)


class ChunkedLMLoss:
    """Output projection + mean cross-entropy, ``chunk`` tokens at a time (module docstring).
    Called with the hidden states the output module passed through, (B, S, d)."""

    def __init__(self, output: nn.Module, chunk: int, group=None, compile_chunks: bool = False) -> None:
        self.output, self.chunk, self.group = output, chunk, group
        # compiled (train.compile, tp 1): inductor fuses each chunk's fp32 upcast and log-softmax
        # with their backward, as compile_loss does for the full logits
        self._loss_of_chunk = torch.compile(self._chunk_loss) if compile_chunks else self._chunk_loss

    def _chunk_loss(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_losses(F.linear(h, weight), targets, self.group).sum()

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h, t = hidden.flatten(0, 1), targets.flatten()  # (N, d), (N,)
        weight = self.output.weight  # (V or V/tp, d)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, t.numel(), self.chunk):
            total = total + checkpoint(self._loss_of_chunk, h[i:i + self.chunk], weight, t[i:i + self.chunk],
                                       use_reentrant=False)
        return total / t.numel()


def _pass_through(x: torch.Tensor) -> torch.Tensor:
    return x


def fold_output_into_loss(model: nn.Module) -> nn.Module:
    """The output module's forward becomes the identity (its hooks still run); returns the module."""
    model.output.forward = _pass_through
    return model.output


def build_loss_fn(cfg: Config, dims: ParallelDims, model: nn.Module | None = None) -> LossFn:
    """The loss for this rank, chosen once (module docstring). ``model``: this rank's model, needed
    for the chunked loss on the stage that holds the output layer (a stage without one has no loss)."""
    group = dims.group("tp") if dims.tp > 1 else None
    chunk = cfg.train.loss_chunk_tokens
    if chunk and model is not None and getattr(model, "output", None) is not None:
        compiled = cfg.train.compile and group is None
        return cp_loss(ChunkedLMLoss(fold_output_into_loss(model), chunk, group, compiled), dims.cp)
    if group is not None:
        return cp_loss(partial(vocab_parallel_lm_loss, group=group), dims.cp)
    return cp_loss(lm_loss, dims.cp)
