"""Apply parallelism to the single-device model, from outside, in one fixed order.

Called on the meta-device model, before its weights exist (STYLE.md, item 4): each transform
swaps modules or drops layers, so a 2B model never materialises unsharded on one rank.
Order: tensor parallelism (swap linears/embedding, sequence-parallel regions) -> pipeline split
-> context parallelism (wraps the inner-attention seam).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from megamod.config import Config
from megamod.model.gpt import GPT
from megamod.parallel.dims import ParallelDims

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over (B, S), in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def parallelize_model(model: GPT, cfg: Config, dims: ParallelDims) -> None:
    """In-place, on the meta device. Degree-1 dimensions are no-ops."""
    if dims.tp > 1 or dims.cp > 1 or dims.pp > 1:
        raise NotImplementedError(
            f"this build supports data parallelism only; got tp={dims.tp} cp={dims.cp} pp={dims.pp} "
            f"(set --parallel.tp/--parallel.cp/--parallel.pp to 1)")


def build_loss_fn(cfg: Config, dims: ParallelDims) -> LossFn:
    """The loss matching the output layer's sharding (vocab-parallel under TP), chosen once."""
    return lm_loss
