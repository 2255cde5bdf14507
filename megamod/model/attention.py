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
    """MoBA block-sparse attention; each of the B sequences is one varlen segment.

    Gate statistics for TensorBoard (``log_metrics``): every ``metrics_every``-th training forward
    the gate is recomputed under no_grad on at most ``metrics_queries`` query positions per
    sequence (fp32, the ops' rule: own block + top (topk-1) complete past blocks, ties to the
    lower index) and accumulated into device tensors; the host reads them only in log_metrics.
    """

    DIST_CAP = 8  # distances >= DIST_CAP share the last histogram bucket ("8+")

    def __init__(self, chunk_size: int, topk: int, metrics_every: int = 10, metrics_queries: int = 32) -> None:
        super().__init__()
        self.chunk_size, self.topk = chunk_size, topk
        self.metrics_every, self.metrics_queries = metrics_every, metrics_queries
        self._calls = 0
        self._stats: dict[str, torch.Tensor] = {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from megamod.ops import moba_attn_varlen

        b, s = q.shape[:2]
        if self.training and self.metrics_every > 0:
            self._maybe_record(q, k)
        cu = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
        o = moba_attn_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, s, self.chunk_size, self.topk)
        return o.view(b, s, *o.shape[1:])

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, topk={self.topk}"

    # ---- gate statistics (device tensors until log time) -----------------------------------------
    @torch.compiler.disable
    def _maybe_record(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Every metrics_every-th training forward; skipped in activation-checkpoint recomputation
        (it runs inside backward and would count a forward twice). Outside torch.compile graphs."""
        if torch._C._current_graph_task_id() != -1:
            return
        if self._calls % self.metrics_every == 0:
            self._record(q, k)
        self._calls += 1

    @torch.no_grad()
    def _record(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Recompute the gate on sampled queries: q (B, S, H, D), k (B, S, Hkv, D). No host sync."""
        b, s, h, _ = q.shape
        c, ks = self.chunk_size, self.topk - 1
        nb = (s + c - 1) // c
        step = max(1, -(-s // self.metrics_queries))
        pos = torch.arange(s - 1, -1, -step, device=q.device)  # (nq,) always includes the last query
        kpad = k.new_zeros(b, nb * c, *k.shape[2:], dtype=torch.float32)
        kpad[:, :s] = k.float()
        means = kpad.view(b, nb, c, *k.shape[2:]).mean(2)  # (B, nb, Hkv, D); only complete blocks compete
        means = means.repeat_interleave(h // k.shape[2], dim=2)  # (B, nb, H, D)
        scores = torch.einsum("bqhd,bnhd->bqhn", q[:, pos].float(), means)  # (B, nq, H, nb)
        own = pos // c  # (nq,)
        elig = torch.arange(nb, device=q.device)[None, :] < own[:, None]  # (nq, nb)
        scores = scores.masked_fill(~elig[None, :, None, :], float("-inf"))
        vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
        n_elig = elig.sum(1)[None, :, None].expand(b, -1, h)  # (B, nq, H)
        hist = torch.zeros(self.DIST_CAP + 1, device=q.device)
        hist[0] += float(b * pos.numel() * h)  # the own block, once per (query, head)
        margin_sum, margin_cnt = hist.new_zeros(()), hist.new_zeros(())
        if ks > 0 and nb > 1:
            kk = min(ks, nb)
            picked = vals[..., :kk] > float("-inf")  # (B, nq, H, kk)
            dist = (own[None, :, None, None] - idx[..., :kk]).clamp(0, self.DIST_CAP)
            hist.index_add_(0, dist.flatten(), picked.flatten().to(hist.dtype))  # no boolean indexing: no sync
            if nb > ks:  # margin: last selected minus first rejected, where something was rejected
                has = n_elig > ks
                margin = vals[..., ks - 1] - vals[..., ks]
                margin_sum = torch.where(has, margin, 0.0).sum()
                margin_cnt = has.sum().float()
        vec = torch.cat([torch.stack([margin_sum, margin_cnt]), hist])
        prev = self._stats.get("train")
        self._stats["train"] = vec if prev is None else prev + vec

    def log_metrics(self) -> dict[str, float]:
        """Sampled gate statistics since the last call (one host sync), {} if none were taken.

        gate_margin: mean fp32 gate score of the last selected past block minus that of the first
        rejected one (over sampled (query, head) pairs that rejected some block); a small margin
        means a near-random choice. dist_{d}: share of all selected blocks (own block included)
        lying d blocks before the query's own block (dist_0 = own block), the last bucket d >= 8."""
        vec = self._stats.pop("train", None)
        if vec is None:
            return {}
        v = vec.tolist()
        out = {}
        if v[1] > 0:
            out["gate_margin"] = v[0] / v[1]
        total = sum(v[2:])
        for d, n in enumerate(v[2:]):
            out[f"dist_{d}" + ("+" if d == self.DIST_CAP else "")] = n / total
        return out


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
        """kv: this layer's KV cache while decoding incrementally (megamod/model/kv_cache.py); it
        stores the new keys/values and attends over everything cached, by original position."""
        b, s, _ = x.shape
        # -1 because TP may have sharded the heads: (B, S, H/tp, D)
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self.inner(q, k, v) if kv is None else kv.attend(q, k, v)  # (B, S, H/tp, D)
        return self.wo(o.flatten(2))
