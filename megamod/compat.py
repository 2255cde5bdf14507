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


# ---- dense attention with its log-sum-exp (context parallelism's pieces) ---------------------
# PyTorch's public SDPA returns no log-sum-exp; merging exact attention pieces needs it, and the
# backward must take the merged output and lse (parallel/cp_attention.py). The private ATen ops
# that SDPA dispatches to (and that torch's own ring attention calls) provide both. Layout
# (B, heads, L, D), heads equal for q and k/v (repeat GQA heads before).


@functools.cache
def _dense_backend(device_index: int) -> str:
    """cuDNN's attention on Hopper (measured 1.6x faster than FlashAttention-2 at the 1b shape,
    benchmarks/experiments/NOTES_throughput.md), else FlashAttention-2. On CPU: the CPU flash op."""
    major, _ = torch.cuda.get_device_capability(device_index)
    return "cudnn" if major >= 9 and torch.backends.cudnn.is_available() else "flash"


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backend: str | None = None):
    """(out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) fp32, state for attention_backward).
    causal: query i sees keys j <= i (Lq == Lk). backend (CUDA): "cudnn" or "flash"; None: the
    device's default (_dense_backend)."""
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse.float(), ("cpu", q, k, v, causal, None, lse.shape, lse.dtype)
    backend = backend or _dense_backend(q.device.index or 0)
    if backend == "cudnn":  # contiguous (B, H, L, D): the backward gets its tensors in the same layout
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False)
    else:
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False)
    b, h, n = q.shape[:3]
    return out, lse.float().reshape(b, h, n), (backend, q, k, v, causal, (cq, ck, mq, mk, seed, offset), lse.shape,
                                               lse.dtype)


def attention_backward(do: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, state):
    """(dq, dk, dv) of one piece, given the merged ``out`` and ``lse`` of the whole attention."""
    backend, q, k, v, causal, extra, lse_shape, lse_dtype = state
    do, out = do.to(q.dtype).contiguous(), out.to(q.dtype).contiguous()
    lse = lse.to(lse_dtype).reshape(lse_shape).contiguous()
    if backend == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, out, lse, 0.0, causal)
    cq, ck, mq, mk, seed, offset = extra
    if backend == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, out, lse, seed, offset, None, cq, ck, mq, mk, 0.0, causal)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, offset)
