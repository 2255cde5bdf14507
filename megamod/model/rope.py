"""Rotary position embedding, computed from explicit positions.

Positions are passed in rather than implied by the index along S, because two callers hold
tokens out of order: context parallelism (a rank holds chunks r and 2cp-1-r) and Mixture-of-
Depths (a routed block sees only the selected tokens, which keep their original positions).
Rotation convention: rotate-half (HF Llama), pairs (i, i + D/2).
"""

from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (..., S) int -> cos, sin (..., S, D/2) in fp32.

    Recomputed every forward: D/2 · S multiply-adds, negligible next to attention, and it keeps
    the model free of position buffers (meta-device construction, any sequence length).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., S, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D); cos/sin (S, D/2) or (B, S, D/2). Computed in fp32, returned in x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads: (.., S, 1, D/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)
