"""Whole-model transforms applied from outside, after construction (torchtitan's apply_* order):
activation checkpointing, then torch.compile, per block. Both keep module names unchanged so
checkpoints do not depend on them."""

from __future__ import annotations

import functools

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
