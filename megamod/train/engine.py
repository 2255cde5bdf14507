"""Building the DeepSpeed engine: it owns ZeRO optimizer state, clipping, bf16 and checkpoints."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from megamod.compat import build_adamw
from megamod.config import Config
from megamod.parallel.dims import ParallelDims


def resolve_dtype(cfg: Config, device: torch.device) -> str:
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    return "bf16" if device.type == "cuda" else "fp32"


def deepspeed_config(cfg: Config, dims: ParallelDims, dtype: str) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.optim.zero_stage}
    if cfg.optim.zero_stage in (1, 2):
        # Overlap the gradient reduce-scatter with backward; contiguous buckets avoid fragmentation.
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e8, allgather_bucket_size=5e8)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * dims.dp,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        # Our optimizer is torch/apex AdamW, not DeepSpeed's own: allow it under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
        # All ranks must agree on the tag. Under PP every stage saves into its own sub-tag of the
        # step (checkpoint.py), which DeepSpeed's world-wide hash check would take for a
        # disagreement; our marker and the broadcast tag on resume keep the ranks together there.
        "checkpoint": {"tag_validation": "FAIL" if dims.pp == 1 else "IGNORE"},
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains (1-D parameters); decay on matrices and embeddings. The last
    pipeline stage's copy of a tied embedding is left out: stage 0 owns it (pipeline.py)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen or getattr(p, "pipeline_tied_copy", False):
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: Config):
    """Linear warm-up to optim.lr, cosine decay to optim.min_lr at train.steps (as a multiplier)."""
    o, steps = cfg.optim, cfg.train.steps
    floor = o.min_lr / o.lr

    def fn(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_engine(cfg: Config, model: nn.Module, dims: ParallelDims, device: torch.device):
    import deepspeed

    dtype = resolve_dtype(cfg, device)
    o = cfg.optim
    optimizer = build_adamw(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dims, dtype), mpu=dims,
                                           dist_init_required=False)
    return engine
