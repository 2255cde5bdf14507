"""Optional fast paths and version shims, decided once (STYLE: no branching in hot code).

apex is not on PyPI; when a cluster image has it, its fused kernels are used. Everything else
falls back to PyTorch's own fused implementations.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.distributed as dist
from torch import nn

# Single-tensor collectives: newer torch calls them all_gather_single / reduce_scatter_single,
# older cluster images only have the *_into_tensor / *_tensor names. Chosen once, at import.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@functools.cache
def have_apex() -> bool:
    return importlib.util.find_spec("apex") is not None


def build_rms_norm(dim: int, eps: float) -> nn.Module:
    """apex's FusedRMSNorm when importable (same parameter name ``weight``), else ``nn.RMSNorm``."""
    if have_apex() and torch.cuda.is_available():
        from apex.normalization import FusedRMSNorm  # type: ignore[import-not-found]

        return FusedRMSNorm(dim, eps=eps)
    return nn.RMSNorm(dim, eps=eps)


def build_adamw(params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                device: torch.device) -> torch.optim.Optimizer:
    """apex FusedAdam (adam_w_mode) when importable on CUDA, else torch AdamW, fused on CUDA."""
    if device.type == "cuda" and have_apex():
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]

        return FusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=device.type == "cuda")
