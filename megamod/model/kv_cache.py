"""Key/value cache for incremental decoding, Mixture-of-Depths and MoBA aware.

    cache = KVCache.for_model(model, batch_size=1, max_len=len(prompt) + max_new_tokens)
    logits = model(prompt_ids, positions=torch.arange(n), cache=cache)      # prefill
    logits = model(next_id, positions=torch.tensor([n]), cache=cache)       # one step

Each layer keeps its own entries: a dense layer appends every token, a routed layer (causal
routing) only the tokens routed into it, so its cache is shorter and the skipped tokens cost it
nothing. Entries remember their original positions; a query attends to the entries of its own
sequence at positions <= its own (RoPE was applied before caching, at the same positions).
Ragged batches: ``valid`` (B, n) marks the real tokens of a call, a prefix of each row (prompts
right-padded); padding writes no entry and its outputs are garbage the caller discards.

The first call of a layer (empty cache: the prefill) attends among the new tokens only, causal by
index — their real entries come first in each row, in position order, so that is causal by
position — through the same kernels as a full forward: SDPA ``is_causal`` (flash on GPU), or
``moba_attn_varlen`` over the rows' real tokens packed varlen. Memory stays linear in the prompt.

MoBA layers (``KVCache.for_model`` finds them) decode sparsely, with the full forward's selection:
the layer's entries, in order, form its sequence (a routed layer's compacted one) cut into blocks
of ``chunk`` entries; the cache keeps fp32 key sums per block, and a query at entry t gates over
the complete past blocks by q . mean(K) (fp32, ties to the lower block), then gathers the keys and
values of its own block and of its top (topk - 1) blocks only: at most topk · chunk keys per query
head, whatever the cache length (``LayerKV.attended`` counts them). MoonshotAI's reference falls
back to dense attention for decoding; this does not.

Shapes: B batch, n new tokens this call, T entries cached in a layer, H query heads, Hkv key/value
heads, G = H / Hkv, D head dim, nb blocks, S selected blocks, C chunk. Storage is allocated once
per layer at ``max_len`` (rounded up to whole MoBA blocks; zeros, so padded reads are finite).
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
        self.filled = 0  # max over rows of length, on the host
        self.uniform = True  # every row has ``filled`` entries (only whole-batch appends so far)
        self.chunk: int | None = None  # MoBA block size: keep fp32 key sums per block
        self.block_sum: torch.Tensor | None = None  # (B, ceil(max_len / chunk), Hkv, D) fp32
        self.attended: torch.Tensor | None = None  # MoBA: keys each query head of the last call saw (B, n, H)

    def _allocate(self, k: torch.Tensor) -> None:
        slots = self.max_len if self.chunk is None else -(-self.max_len // self.chunk) * self.chunk
        shape = (self.batch_size, slots, *k.shape[2:])
        self.k = k.new_zeros(shape)
        self.v = k.new_zeros(shape)
        self.pos = torch.zeros(self.batch_size, slots, dtype=torch.long, device=k.device)
        self.length = torch.zeros(self.batch_size, dtype=torch.long, device=k.device)
        if self.chunk is not None:
            nb = slots // self.chunk
            self.block_sum = torch.zeros(self.batch_size, nb, *k.shape[2:], dtype=torch.float32, device=k.device)

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
               all_valid: bool = False) -> None:
        """k/v (B, n, Hkv, D), pos (B, n); ``valid`` (B, n) is a prefix mask per row (the
        entries to keep come first, in position order; the rest is padding and is not stored).
        ``all_valid``: the caller knows on the host that every token is real (no sync needed)."""
        if self.k is None:
            self._allocate(k)
        b, n = valid.shape
        if all_valid and self.uniform:  # every row grows by n at the same slot: slices, no host sync
            t0, self.filled = self.filled, self.filled + n
            if self.filled > self.max_len:
                raise RuntimeError(f"KV cache full: max_len {self.max_len}; build KVCache with a larger max_len")
            self.k[:, t0:self.filled], self.v[:, t0:self.filled], self.pos[:, t0:self.filled] = k, v, pos
            if self.block_sum is not None:
                rows = torch.arange(b, device=k.device).repeat_interleave(n)
                self._add_block_sums(rows, (t0 + torch.arange(n, device=k.device)).repeat(b), k.flatten(0, 1))
            self.length = self.length + n
            return
        new_len = self.length + valid.sum(1)  # (B,)
        self.filled = int(new_len.max())  # host sync
        if self.filled > self.max_len:
            raise RuntimeError(f"KV cache full: max_len {self.max_len}; build KVCache with a larger max_len")
        rows = torch.arange(b, device=k.device)[:, None].expand_as(valid)[valid]
        slots = (self.length[:, None] + torch.arange(n, device=k.device))[valid]
        self.k[rows, slots] = k[valid]
        self.v[rows, slots] = v[valid]
        self.pos[rows, slots] = pos[valid]
        if self.block_sum is not None:
            self._add_block_sums(rows, slots, k[valid])
        self.length = new_len
        self.uniform = all_valid and self.uniform

    def _add_block_sums(self, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor) -> None:
        """Entries arrive in order, so the sums accumulate like the full forward's block means."""
        flat = self.block_sum.view(-1, *k.shape[1:])
        flat.index_add_(0, rows * self.block_sum.shape[1] + slots // self.chunk, k.float())


@dataclass
class KVStep:
    """What one layer appends and attends with in this forward: the new tokens' original
    positions (B, n) and which of them are real (B, n; a prefix per row) — a routed block passes
    its compacted, padded selection here."""

    store: LayerKV
    positions: torch.Tensor
    valid: torch.Tensor
    moba: tuple[int, int] | None = None  # (chunk_size, topk) for a MoBA layer
    all_valid: bool = False  # known on the host: every token of this step is real

    def select(self, idx: torch.Tensor, valid: torch.Tensor) -> "KVStep":
        """The step for the tokens at ``idx`` (B, m) of this step, ``valid`` (B, m) of them real."""
        return KVStep(self.store, self.positions.gather(1, idx), valid & self.valid.gather(1, idx), self.moba)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the real new k/v, then attend: q (B, n, H, D) -> (B, n, H, D)."""
        s = self.store
        if self.moba is not None:
            s.chunk = self.moba[0]
        prefill = s.filled == 0
        before = s.length if s.length is not None else torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        s.append(k, v, self.positions, self.valid, self.all_valid)
        if prefill:
            return self._prefill(q, k, v)
        if self.moba is not None:
            return _moba_decode(q, s, before, self.valid, *self.moba)
        t = s.filled
        keys = torch.arange(t, device=q.device)
        # (B, n, T): own sequence's stored entries at positions <= the query's. Padding queries
        # (outputs discarded) see every slot, so no softmax row is empty.
        mask = (keys < s.length[:, None])[:, None, :] & (s.pos[:, None, :t] <= self.positions[:, :, None])
        mask = mask | ~self.valid[:, :, None]
        ks, vs = s.k[:, :t].transpose(1, 2), s.v[:, :t].transpose(1, 2)  # (B, Hkv, T, D)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), ks, vs, attn_mask=mask[:, None],
                                           enable_gqa=ks.shape[1] != q.shape[2])
        return o.transpose(1, 2)  # (B, n, H, D)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention among the new tokens of an empty cache (see the module docstring)."""
        if self.moba is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=k.shape[2] != q.shape[2])
            return o.transpose(1, 2)  # (B, n, H, D)
        from megamod.ops import moba_attn_varlen

        chunk, topk = self.moba
        b, n = q.shape[:2]
        count = self.valid.sum(1)  # (B,)
        if self.all_valid:
            cu = torch.arange(0, (b + 1) * n, n, device=q.device, dtype=torch.int32)
            packed = (q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1))
        else:  # rows' real tokens back to back; empty rows are left out of cu_seqlens
            lens = count[count > 0]
            cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
            packed = (q[self.valid], k[self.valid], v[self.valid])
        o = moba_attn_varlen(*packed, cu, int(count.max()), chunk, topk)  # (real tokens, H, D)
        if self.all_valid:
            return o.view(q.shape)
        return q.new_zeros(q.shape).index_put_((self.valid,), o)


def _moba_decode(q: torch.Tensor, s: LayerKV, before: torch.Tensor, valid: torch.Tensor, chunk: int,
                 topk: int) -> torch.Tensor:
    """New queries q (B, n, H, D) at entries before + 0..n-1 over a cache already holding them:
    each sees entries e <= its own of its own block and of its top (topk - 1) complete past
    blocks, gathered — S <= topk blocks of C keys per query head, never the whole cache."""
    b, n, h, d = q.shape
    hkv = s.k.shape[2]
    entry = before[:, None] + torch.arange(n, device=q.device)  # (B, n) the queries' own entries
    own = entry // chunk  # (B, n)
    nb = -(-s.filled // chunk)
    past = min(topk - 1, nb - 1)  # past blocks a query can pick
    sel = own[:, :, None, None].expand(b, n, h, 1)  # (B, n, H, 1)
    ok = torch.ones_like(sel, dtype=torch.bool)
    if past > 0:
        means = (s.block_sum[:, :nb] / chunk).repeat_interleave(h // hkv, dim=2)  # (B, nb, H, D)
        scores = torch.einsum("bnhd,bjhd->bnhj", q.float(), means)  # (B, n, H, nb)
        blk = torch.arange(nb, device=q.device)
        elig = (blk[None, None, :] < own[:, :, None])[:, :, None, :]  # (B, n, 1, nb): wholly in the past
        scores = scores.masked_fill(~elig, float("-inf"))
        vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
        sel = torch.cat([sel, idx[..., :past]], dim=-1)  # (B, n, H, S)
        ok = torch.cat([ok, vals[..., :past] > float("-inf")], dim=-1)  # fewer eligible: the rest masked
    blocks_k = s.k.view(b, -1, chunk, hkv, d)  # (B, nb_alloc, C, Hkv, D)
    blocks_v = s.v.view(b, -1, chunk, hkv, d)
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    gi = (torch.arange(h, device=q.device) // (h // hkv))[None, None, :, None]  # query head -> kv head
    ks = blocks_k[bi, sel, :, gi].flatten(3, 4)  # (B, n, H, S·C, D): only the selected blocks
    vs = blocks_v[bi, sel, :, gi].flatten(3, 4)
    keys = (sel[..., None] * chunk + torch.arange(chunk, device=q.device)).flatten(3)  # (B, n, H, S·C) entries
    mask = ok.repeat_interleave(chunk, dim=-1) & (keys <= entry[:, :, None, None])  # causal in the own block
    s.attended = (mask & valid[:, :, None, None]).sum(-1)  # (B, n, H); padding queries count 0
    mask = mask | ~valid[:, :, None, None]  # padding queries (outputs discarded): no empty softmax row
    o = F.scaled_dot_product_attention(q.reshape(b * n, h, 1, d), ks.flatten(0, 1), vs.flatten(0, 1),
                                       attn_mask=mask.flatten(0, 1)[:, :, None, :])
    return o.view(b, n, h, d)


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

    def layer(self, layer_id: int, positions: torch.Tensor, valid: torch.Tensor | None = None) -> KVStep:
        """Layer ``layer_id``'s step for new tokens at ``positions`` (n,) or (B, n); ``valid``
        (B, n): the real ones, a prefix per row (default: all)."""
        positions = positions.expand(self.batch_size, positions.shape[-1])
        all_valid = valid is None
        if valid is None:
            valid = torch.ones_like(positions, dtype=torch.bool)
        store = self.layers.setdefault(layer_id, LayerKV(self.batch_size, self.max_len))
        return KVStep(store, positions, valid, self.moba.get(layer_id), all_valid)

    def lengths(self) -> dict[int, list[int]]:
        """Entries per layer and sequence (a routed layer holds fewer than a dense one)."""
        return {i: s.length.tolist() for i, s in self.layers.items() if s.length is not None}
