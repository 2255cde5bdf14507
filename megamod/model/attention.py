"""Attention: projections + RoPE around a small inner-attention seam.

Shapes: B batch, S sequence (as held by this rank), H query heads, Hkv key/value heads,
D head dim. ``H/tp`` where TP has sharded the heads: reshapes use -1 so this file never
knows the TP degree.

The seam (torchtitan's ScaledDotProductAttentionWrapper idea): an inner attention maps
q (B, S, H, D), k/v (B, S, Hkv, D) -> (B, S, H, D), causal in the order of S. Dense SDPA and
MoBA are two implementations; context parallelism wraps exactly this seam.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamod.model.rope import apply_rope


class SDPAttention(nn.Module):
    """Dense causal attention through PyTorch SDPA (cuDNN/flash on GPU, math/flash on CPU)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return o.transpose(1, 2)  # (B, S, H, D)


class MobaAttention(nn.Module):
    """MoBA block-sparse attention; each of the B sequences is one varlen segment."""

    def __init__(self, chunk_size: int, topk: int) -> None:
        super().__init__()
        self.chunk_size, self.topk = chunk_size, topk

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from megamod.ops import moba_attn_varlen

        b, s = q.shape[:2]
        cu = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
        o = moba_attn_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, s, self.chunk_size, self.topk)
        return o.view(b, s, *o.shape[1:])

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, topk={self.topk}"


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, inner: nn.Module) -> None:
        super().__init__()
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.inner = inner

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None) -> torch.Tensor:
        """kv: this layer's KV cache while decoding incrementally (megamod/infer/kv_cache.py); it
        stores the new keys/values and attends over everything cached, by original position."""
        b, s, _ = x.shape
        # -1 because TP may have sharded the heads: (B, S, H/tp, D)
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self.inner(q, k, v) if kv is None else kv.attend(q, k, v)  # (B, S, H/tp, D)
        return self.wo(o.flatten(2))
