"""Key/value cache for incremental decoding, Mixture-of-Depths aware.

    cache = KVCache(batch_size=1, max_len=len(prompt) + max_new_tokens)
    logits = model(prompt_ids, positions=torch.arange(n), cache=cache)      # prefill
    logits = model(next_id, positions=torch.tensor([n]), cache=cache)       # one step

Each layer keeps its own entries: a dense layer appends every token, a routed layer (causal
routing) only the tokens routed into it, so its cache is shorter and the skipped tokens cost it
nothing. Entries remember their original positions; a query attends to the entries of its own
sequence at positions <= its own (RoPE was applied before caching, at the same positions).

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

    def _allocate(self, k: torch.Tensor) -> None:
        shape = (self.batch_size, self.max_len, *k.shape[2:])
        self.k = k.new_zeros(shape)
        self.v = k.new_zeros(shape)
        self.pos = torch.zeros(self.batch_size, self.max_len, dtype=torch.long, device=k.device)
        self.length = torch.zeros(self.batch_size, dtype=torch.long, device=k.device)

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
        self.length = self.length + count


@dataclass
class KVStep:
    """What one layer appends and attends with in this forward: the new tokens' original
    positions (B, n) and which of them are real (B, n; a prefix per row) — a routed block passes
    its compacted, padded selection here."""

    store: LayerKV
    positions: torch.Tensor
    valid: torch.Tensor

    def select(self, idx: torch.Tensor, valid: torch.Tensor) -> "KVStep":
        """The step for the tokens at ``idx`` (B, m) of this step, ``valid`` (B, m) of them real."""
        return KVStep(self.store, self.positions.gather(1, idx), valid & self.valid.gather(1, idx))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the real new k/v, then attend: q (B, n, H, D) -> (B, n, H, D)."""
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


class KVCache:
    """All layers' caches for a batch of sequences decoded together."""

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.layers: dict[int, LayerKV] = {}

    def layer(self, layer_id: int, positions: torch.Tensor) -> KVStep:
        """Layer ``layer_id``'s step for new tokens at ``positions`` (n,) or (B, n)."""
        positions = positions.expand(self.batch_size, positions.shape[-1])
        store = self.layers.setdefault(layer_id, LayerKV(self.batch_size, self.max_len))
        return KVStep(store, positions, torch.ones_like(positions, dtype=torch.bool))

    def lengths(self) -> dict[int, list[int]]:
        """Entries per layer and sequence (a routed layer holds fewer than a dense one)."""
        return {i: s.length.tolist() for i, s in self.layers.items() if s.length is not None}
