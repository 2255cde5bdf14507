"""Building the DeepSpeed engine: it owns ZeRO optimizer state, clipping, bf16 and checkpoints.

Three bf16 recipes (train.bf16_mode), chosen once here:
- master_fused (one rank, ZeRO 0): bf16 weights, and megamod's ``MasterAdamW`` holds the fp32
  master weights and moments and steps them in one fused kernel that also writes the bf16
  weights (train/master_adamw.py). No cast passes; DeepSpeed sees an fp32-mode engine and
  checkpoints the optimizer's state. The fastest single-GPU step;
- master_weights: bf16 weights and gradients, fp32 master weights inside DeepSpeed's ZeRO
  optimizer (the multi-GPU recipe: bf16 gradient reduction, weights gathered in bf16);
- autocast: fp32 weights, bf16 matmuls under torch.autocast (DeepSpeed's ``torch_autocast``).
  At ZeRO 0 DeepSpeed then steps our optimizer directly, and ``ClippingAdamW`` folds clipping
  and the non-finite check into the fused AdamW kernel. On one GPU this skips the ZeRO-1 bf16
  path's per-parameter work (fp64 norms, overflow checks, bucket copies, a host sync).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from megamod.compat import build_adamw
from megamod.config import Config
from megamod.parallel.dims import ParallelDims
from megamod.train.clipping import ClippingAdamW


def resolve_dtype(cfg: Config, device: torch.device) -> str:
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    return "bf16" if device.type == "cuda" else "fp32"


def resolve_precision(cfg: Config, device: torch.device, world_size: int = 1) -> str:
    """'fp32', 'bf16' (bf16 weights, fp32 master weights in DeepSpeed), 'master_fused' (bf16
    weights, fp32 master weights in MasterAdamW) or 'autocast'."""
    return precision_for(cfg, resolve_dtype(cfg, device), world_size)


def precision_for(cfg: Config, dtype: str, world_size: int = 1) -> str:
    """``resolve_precision`` for a known dtype (the dry run plans for a device it does not have)."""
    if dtype == "fp32":
        return "fp32"
    mode = cfg.train.bf16_mode
    if mode == "auto":
        mode = ("master_weights" if cfg.optim.zero_stage > 0 else "master_fused" if world_size == 1
                else "autocast")
    return {"master_weights": "bf16", "master_fused": "master_fused", "autocast": "autocast"}[mode]


def clips_in_optimizer(cfg: Config, dims: ParallelDims) -> bool:
    """At ZeRO 0 DeepSpeed hands our optimizer the full gradients, already reduced over dp·cp, so
    it can clip them itself; under TP/PP its norm is reduced over the model-parallel group the way
    DeepSpeed's is (ClippingAdamW)."""
    return cfg.optim.zero_stage == 0


def deepspeed_config(cfg: Config, dims: ParallelDims, precision: str, optimizer_clips: bool = False) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.optim.zero_stage}
    if cfg.optim.zero_stage in (1, 2):
        # Overlap the gradient reduce-scatter with backward; contiguous buckets avoid fragmentation.
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e8, allgather_bucket_size=5e8)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * dims.dp,
        "gradient_clipping": 0.0 if optimizer_clips else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "torch_autocast": {"enabled": precision == "autocast", "dtype": "bfloat16"},
        # Our optimizer is torch/apex AdamW, not DeepSpeed's own: allow it under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every forward and every step()
        # call: the host then waits for the GPU and the GPU for the host's next launches, once
        # per micro-batch. We time steps ourselves (metrics.py), without a sync.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
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

    precision = resolve_precision(cfg, device, dims.world_size)
    optimizer_clips = clips_in_optimizer(cfg, dims)
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if precision == "master_fused":  # config.validate allows it on one rank at ZeRO 0 only
        from megamod.train.master_adamw import MasterAdamW  # imports triton: only when chosen

        names = {id(p): n for n, p in model.named_parameters()}
        for g in groups:  # in the optimizer's state_dict: consolidated_state_dict reads the master weights by name
            g["param_names"] = [names[id(p)] for p in g["params"]]
        optimizer = MasterAdamW(groups, max_norm=o.grad_clip, accumulate=cfg.train.grad_accum > 1, **kwargs)
        model.to(torch.bfloat16)  # the buffers; the parameters are bf16 views of the optimizer's buffer now
    elif optimizer_clips:
        model_parallel = dims.tp * dims.pp > 1
        optimizer = ClippingAdamW(groups, max_norm=o.grad_clip, norm_group=dims.group("mp") if model_parallel else None,
                                  count_replicated=dims.coords()["tp"] == 0, **kwargs)
    else:
        optimizer = build_adamw(groups, device=device, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dims, precision, optimizer_clips),
                                           mpu=dims, dist_init_required=False)
    if cfg.optim.zero_stage == 0 and dims.dp * dims.cp == 1:
        # ZeRO 0 all-reduces every gradient after backward through flat 500M-element buckets
        # (a copy in, a scale, a copy back: ~30 GB of traffic for 1.3B fp32 gradients) even when
        # the data-parallel group is this rank alone. DeepSpeed turns this off itself without a
        # distributed backend; one data-parallel rank has nothing to reduce either.
        engine.enable_backward_allreduce = False
    return engine
