"""A transformer block (pre-norm attention + SwiGLU MLP), the unit both the dense model and
Mixture-of-Depths routed blocks (mod.py) build on. Single-device; TP/SP/CP act on it from outside.

Notation: B batch, S sequence, d model width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megamod.compat import build_rms_norm
from megamod.config import ModelConfig
from megamod.model.attention import Attention

if TYPE_CHECKING:
    from megamod.model.kv_cache import KVStep


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, inner_attention: nn.Module) -> None:
        super().__init__()
        self.attention_norm = build_rms_norm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, inner_attention)
        self.ffn_norm = build_rms_norm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = MLP(cfg.d_model, cfg.ffn_hidden)

    def residual(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv: KVStep | None = None) -> torch.Tensor:
        """f(x) with block output x + f(x); Mixture-of-Depths scales exactly this by g(r).
        ``kv``: this layer's KV cache during incremental decoding (megamod/model/kv_cache.py)."""
        a = self.attention(self.attention_norm(x), cos, sin, kv)
        return a + self.feed_forward(self.ffn_norm(x + a))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVStep | None = None) -> torch.Tensor:
        return x + self.residual(x, cos, sin, kv)
