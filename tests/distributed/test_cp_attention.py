"""Context-parallel attention == single-device attention: outputs, log-sum-exp, q/k/v gradients.

Every rank draws the same full-sequence q, k, v, dO (one seed), computes the single-device
reference (dense: masked softmax in fp64; MoBA: moba_attn_varlen_reference, the dense masked
reference with its own brute-force selection), then runs ContextParallelAttention on its zigzag
shard and compares with the reference's shard. fp32, tolerance 1e-5 relative to the largest
reference magnitude: the pieces compute the same sums split over key sets and merged by
log-sum-exp (fp32 rounding, ~1e-7 per op), while any layout, mask, selection or gradient-routing
bug is O(1). Cases: cp 2 and 4, MHA and GQA, several sequences per batch, and MoBA inputs built
so that every pick of the last chunk's queries lies in one remote chunk.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _harness import run_distributed

# (kind, batch, seq, H, Hkv, D, moba chunk, topk, craft): craft steers the gate of MoBA inputs
CASES = [("dense", 2, 32, 4, 2, 8, 0, 0, False), ("dense", 1, 48, 2, 2, 8, 0, 0, False),
         ("moba", 2, 64, 4, 2, 8, 4, 3, False), ("moba", 1, 96, 2, 1, 8, 4, 4, True)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _inputs(b, s, h, hkv, d, chunk, craft, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, n, d, generator=g) for n in (h, hkv, hkv))
    if craft:  # blocks of global chunk 1 get keys along u, every query leans on u: they win every gate
        u = torch.randn(d, generator=g)
        c = s // 8  # the chunk length at cp = 4 (case used with cp 2 too: then half a chunk)
        k[:, c:2 * c] += 3 * u
        q += u
    return q, k, v, torch.randn(b, s, h, d, generator=g)


def _reference(kind, q, k, v, chunk, topk):
    """(out, lse (B, S, H), grads) of the whole sequence on one device."""
    from megamod.ops.moba import moba_attn_varlen_reference

    b, s, h, d = q.shape
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    if kind == "dense":
        g = h // k.shape[2]
        qq, kk, vv = (t.double().transpose(1, 2) for t in (x[0], x[1].repeat_interleave(g, 2),
                                                             x[2].repeat_interleave(g, 2)))
        logits = (qq @ kk.transpose(-1, -2)) * d**-0.5
        logits = logits.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        lse = torch.logsumexp(logits, -1).transpose(1, 2).float()
        out = (torch.softmax(logits, -1) @ vv).transpose(1, 2).float()
    else:
        cu = torch.arange(0, b * s + 1, s, dtype=torch.int32)
        out, lse = moba_attn_varlen_reference(*(t.reshape(b * s, *t.shape[2:]) for t in x), cu, s, chunk, topk,
                                              return_lse=True)
        out, lse = out.view(b, s, h, d), lse.view(b, s, h)
    return out, lse, x


def _body(rank: int, world_size: int) -> dict:
    from megamod.model.attention import MobaAttention, SDPAttention
    from megamod.parallel.context import shard_sequence
    from megamod.parallel.cp_attention import ContextParallelAttention
    from megamod.parallel.cp_comm import CPComm

    res = {}
    for kind, b, s, h, hkv, d, chunk, topk, craft in CASES:
        q, k, v, do = _inputs(b, s, h, hkv, d, chunk, craft)
        out, lse, x = _reference(kind, q, k, v, chunk, topk)
        grads = torch.autograd.grad((out * do).sum(), x)
        inner = MobaAttention(chunk, topk) if kind == "moba" else SDPAttention()
        attn = ContextParallelAttention(inner, CPComm(dist.group.WORLD, rank, world_size)).train()
        loc = [shard_sequence(t, world_size, rank).clone().requires_grad_() for t in (q, k, v)]
        o, l = attn.forward_with_lse(*loc)
        g = torch.autograd.grad((o * shard_sequence(do, world_size, rank)).sum(), loc)
        # dk/dv of a shard: its own keys' gradients, summed from every rank's queries (reduce-scatter)
        errs = [_rel(o, shard_sequence(out, world_size, rank)), _rel(l, shard_sequence(lse, world_size, rank))]
        errs += [_rel(a, shard_sequence(r, world_size, rank)) for a, r in zip(g, grads)]
        metrics = attn.log_metrics()
        res[(kind, b, s, h, hkv, craft)] = (errs, metrics)
    return res


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_matches_single_device(cp):
    results = run_distributed(_body, cp)
    for key in results[0]:
        for rank, res in enumerate(results):
            errs, _ = res[key]
            assert max(errs) < 1e-5, (cp, rank, key, errs)
    # bytes per layer and rank, counted from the tensors handed to the collectives, against the
    # formula (README): K and V all-gathered forward, their gradients reduce-scattered backward,
    # (cp-1)/cp of the whole sequence's B·S·Hkv·D fp32 elements each; MoBA also gathers the means.
    for kind, b, s, h, hkv, d, chunk, topk, craft in CASES:
        kv = (cp - 1) * b * (s // cp) * hkv * d * 4
        for res in results:
            m = res[(kind, b, s, h, hkv, craft)][1]
            assert m["cp_bytes_k"] == m["cp_bytes_v"] == m["cp_bytes_dk"] == m["cp_bytes_dv"] == kv
            if kind == "moba":
                assert m["cp_bytes_means"] == (cp - 1) * b * (s // cp // chunk) * hkv * d * 4
    # the crafted MoBA case: rank 0's late chunk picks only blocks of chunk 1 (remote at cp 4)
    craft_key = next(k for k in results[0] if k[-1])
    if cp == 4:
        m0 = results[0][craft_key][1]
        assert 0 < m0["cp_remote_blocks"] < m0["cp_remote_total"]
