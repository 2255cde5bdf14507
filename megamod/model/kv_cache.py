"""Key/value cache for incremental decoding, Mixture-of-Depths aware.

    cache = KVCache(batch_size=1, max_len=len(prompt) + max_new_tokens)
    logits = model(prompt_ids, positions=torch.arange(n), cache=cache)      # prefill
    logits = model(next_id, positions=torch.tensor([n]), cache=cache)       # one step

Each layer keeps its own entries: a dense layer appends every token, a routed layer (causal
routing) only the tokens routed into it, so its cache is shorter and the skipped tokens cost it
nothing. Entries remember their original positions; a query attends to the entries of its own
sequence at positions <= its own (RoPE was applied before caching, at the same positions).

MoBA layers (``KVCache.for_model`` finds them) gate every new query like the full forward: the
layer's entries, in order, form its sequence (a routed layer's compacted one) cut into blocks of
``chunk`` entries; the cache keeps fp32 key sums per block, and a query at entry t attends to its
own block causally plus the top (topk - 1) complete past blocks by q . mean(K) (fp32, ties to the
lower block), exactly the selection of megamod.ops.moba.

Shapes: B batch, n new tokens this call, T entries cached in a layer, Hkv key/value heads,
D head dim. Storage is allocated once per layer at ``max_len`` (zeros, so padded reads are finite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class LayerKV:
    """One layer's entries: k/v (B, max_len, Hkv, D), their positions, and a length per sequence."""

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # (B, max_len) original positions
        self.length: torch.Tensor | None = None  # (B,) entries per sequence
        self.chunk: int | None = None  # MoBA block size: keep fp32 key sums per block
        self.block_sum: torch.Tensor | None = None  # (B, ceil(max_len / chunk), Hkv, D) fp32

    def _allocate(self, k: torch.Tensor) -> None:
        shape = (self.batch_size, self.max_len, *k.shape[2:])
        self.k = k.new_zeros(shape)
        self.v = k.new_zeros(shape)
        self.pos = torch.zeros(self.batch_size, self.max_len, dtype=torch.long, device=k.device)
        self.length = torch.zeros(self.batch_size, dtype=torch.long, device=k.device)
        if self.chunk is not None:
            nb = -(-self.max_len // self.chunk)
            self.block_sum = torch.zeros(self.batch_size, nb, *k.shape[2:], dtype=torch.float32, device=k.device)

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> None:
        """k/v (B, n, Hkv, D), pos (B, n); ``valid`` (B, n) is a prefix mask per row (the
        entries to keep come first, in position order; the rest is padding and is not stored)."""
        if self.k is None:
            self._allocate(k)
        count = valid.sum(1)  # (B,)
        if int((self.length + count).max()) > self.max_len:
            raise RuntimeError(f"KV cache full: max_len {self.max_len}; build KVCache with a larger max_len")
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(valid)[valid]
        slots = (self.length[:, None] + torch.arange(k.shape[1], device=k.device))[valid]
        self.k[rows, slots] = k[valid]
        self.v[rows, slots] = v[valid]
        self.pos[rows, slots] = pos[valid]
        if self.block_sum is not None:  # entries in order, so sums accumulate like the full forward's
            flat = self.block_sum.view(-1, *k.shape[2:])
            flat.index_add_(0, rows * self.block_sum.shape[1] + slots // self.chunk, k[valid].float())
        self.length = self.length + count


@dataclass
class KVStep:
    """What one layer appends and attends with in this forward: the new tokens' original
    positions (B, n) and which of them are real (B, n; a prefix per row) — a routed block passes
    its compacted, padded selection here."""

    store: LayerKV
    positions: torch.Tensor
    valid: torch.Tensor
    moba: tuple[int, int] | None = None  # (chunk_size, topk) for a MoBA layer

    def select(self, idx: torch.Tensor, valid: torch.Tensor) -> "KVStep":
        """The step for the tokens at ``idx`` (B, m) of this step, ``valid`` (B, m) of them real."""
        return KVStep(self.store, self.positions.gather(1, idx), valid & self.valid.gather(1, idx), self.moba)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the real new k/v, then attend: q (B, n, H, D) -> (B, n, H, D)."""
        if self.moba is not None:
            return self._attend_moba(q, k, v)
        s = self.store
        s.append(k, v, self.positions, self.valid)
        t = int(s.length.max())
        keys = torch.arange(t, device=q.device)
        # (B, n, T): own sequence's stored entries at positions <= the query's. Padding queries
        # (outputs discarded) see every slot, so no softmax row is empty.
        mask = (keys < s.length[:, None])[:, None, :] & (s.pos[:, None, :t] <= self.positions[:, :, None])
        mask = mask | ~self.valid[:, :, None]
        ks, vs = s.k[:, :t].transpose(1, 2), s.v[:, :t].transpose(1, 2)  # (B, Hkv, T, D)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), ks, vs, attn_mask=mask[:, None],
                                           enable_gqa=ks.shape[1] != q.shape[2])
        return o.transpose(1, 2)  # (B, n, H, D)

    def _attend_moba(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """MoBA over the cached entries: the new query at entry t sees entries e <= t of its own
        block (t // chunk) and of the top (topk - 1) complete past blocks i < t // chunk."""
        chunk, topk = self.moba
        s = self.store
        s.chunk = chunk
        before = s.length.clone() if s.length is not None else torch.zeros(q.shape[0], dtype=torch.long,
                                                                             device=q.device)
        s.append(k, v, self.positions, self.valid)
        b, n, h, _ = q.shape
        t = int(s.length.max())
        nb = -(-t // chunk)
        entry = before[:, None] + torch.arange(n, device=q.device)  # (B, n) the queries' own entries
        own = entry // chunk  # (B, n)
        blk = torch.arange(nb, device=q.device)
        picked = blk[None, None, None, :] == own[:, :, None, None]  # (B, n, 1, nb) own block
        if topk > 1 and nb > 1:
            means = (s.block_sum[:, :nb] / chunk).repeat_interleave(h // s.k.shape[2], dim=2)  # (B, nb, H, D)
            scores = torch.einsum("bnhd,bjhd->bnhj", q.float(), means)  # (B, n, H, nb)
            elig = (blk[None, None, :] < own[:, :, None])[:, :, None, :]  # (B, n, 1, nb): wholly in the past
            scores = scores.masked_fill(~elig, float("-inf"))
            vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
            kk = min(topk - 1, nb)
            top = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx[..., :kk], vals[..., :kk] > float("-inf"))
            picked = picked | top  # (B, n, H, nb)
        keys = torch.arange(t, device=q.device)
        vis = picked.expand(b, n, h, nb).gather(-1, (keys // chunk).expand(b, n, h, t))  # (B, n, H, T)
        causal = (keys[None, None, :] <= entry[:, :, None]) & (keys < s.length[:, None])[:, None, :]  # (B, n, T)
        # Padding queries (outputs discarded) see every slot, so no softmax row is empty.
        mask = (vis & causal[:, :, None, :]) | ~self.valid[:, :, None, None]
        ks, vs = s.k[:, :t].transpose(1, 2), s.v[:, :t].transpose(1, 2)  # (B, Hkv, T, D)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), ks, vs, attn_mask=mask.transpose(1, 2),
                                           enable_gqa=ks.shape[1] != q.shape[2])
        return o.transpose(1, 2)  # (B, n, H, D)


class KVCache:
    """All layers' caches for a batch of sequences decoded together."""

    def __init__(self, batch_size: int, max_len: int, moba: dict[int, tuple[int, int]] | None = None) -> None:
        """moba: {layer id: (chunk_size, topk)} of the MoBA layers (``for_model`` fills it in)."""
        self.batch_size, self.max_len = batch_size, max_len
        self.moba = dict(moba or {})
        self.layers: dict[int, LayerKV] = {}

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> "KVCache":
        """A cache that knows which of ``model``'s layers use MoBA (a plain KVCache treats every
        layer as dense, which is wrong for MoBA layers)."""
        from megamod.model.attention import MobaAttention

        moba = {int(i): (layer.attention.inner.chunk_size, layer.attention.inner.topk)
                for i, layer in model.layers.items() if isinstance(layer.attention.inner, MobaAttention)}
        return cls(batch_size, max_len, moba)

    def layer(self, layer_id: int, positions: torch.Tensor) -> KVStep:
        """Layer ``layer_id``'s step for new tokens at ``positions`` (n,) or (B, n)."""
        positions = positions.expand(self.batch_size, positions.shape[-1])
        store = self.layers.setdefault(layer_id, LayerKV(self.batch_size, self.max_len))
        return KVStep(store, positions, torch.ones_like(positions, dtype=torch.bool), self.moba.get(layer_id))

    def lengths(self) -> dict[int, list[int]]:
        """Entries per layer and sequence (a routed layer holds fewer than a dense one)."""
        return {i: s.length.tolist() for i, s in self.layers.items() if s.length is not None}
