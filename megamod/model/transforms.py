"""Whole-model transforms applied from outside, after construction (torchtitan's apply_* order):
activation checkpointing, then torch.compile, per block (and the loss, ``compile_loss``). Both
keep module names unchanged so checkpoints do not depend on them."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from megamod.model.gpt import GPT


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block in backward: activations kept per block drop to its input."""
    for block in model.layers.values():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: GPT) -> None:
    """Compile each block separately: blocks share one graph (same shapes), so compile time stays
    that of a single block, and pipeline stages can hold any subset of them."""
    for block in model.layers.values():
        block.compile(fullgraph=False)


def compile_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 tp: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss over the (B, S, V) logits under torch.compile: inductor fuses the fp32 upcast,
    log-softmax and their backward into one pass over the logits each way (eager, ~18 GB of
    traffic for the 1b model at micro-batch 8; compiled, 5 ms and 3.9 GiB less a step on an
    H100, benchmarks/experiments/NOTES_throughput.md). The vocab-parallel loss (tp > 1) has collectives inside and
    stays eager."""
    return torch.compile(loss_fn) if tp == 1 else loss_fn
