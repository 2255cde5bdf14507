"""MoBA semantics (DESIGN.md, "MoBA") on CPU: the block-gather path, the dense reference and the
public dispatch. fp32/fp64, random inputs, packed batches whose last blocks are partial."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megamod.ops import moba_attn_varlen
from megamod.ops.moba import moba_attn_varlen_gather, moba_attn_varlen_reference, moba_select_blocks

# (sequence lengths, chunk, topk, H, Hkv): every pack has a partial last block somewhere
CASES = [
    ([37, 64, 5, 100], 8, 3, 4, 2),
    ([50, 23], 16, 2, 2, 2),
    ([129], 16, 4, 4, 1),
    ([70, 45, 9], 12, 5, 2, 2),
]


def make(lens, H, Hkv, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(T, H, D, generator=g, dtype=dtype)
    k = torch.randn(T, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(T, Hkv, D, generator=g, dtype=dtype)
    return q, k, v, cu


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def run(fn, q, k, v, cu, B, topk, do, dl):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, cu, int((cu[1:] - cu[:-1]).max()), B, topk, return_lse=True)
    grads = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, k, v))
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize("lens,B,topk,H,Hkv", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_gather_matches_reference(lens, B, topk, H, Hkv, dtype, tol):
    q, k, v, cu = make(lens, H, Hkv, dtype=dtype)
    do = torch.randn(q.shape, dtype=dtype)
    dl = torch.randn(q.shape[:2], dtype=torch.float32)
    o1, l1, g1 = run(moba_attn_varlen_gather, q, k, v, cu, B, topk, do, dl)
    o2, l2, g2 = run(moba_attn_varlen_reference, q, k, v, cu, B, topk, do, dl)
    assert rel(o1, o2) < tol and rel(l1, l2) < tol
    for a, b in zip(g1, g2):
        assert rel(a, b) < tol


def causal_full(q, k, v, cu):
    G = q.shape[1] // k.shape[1]
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [heads, L, D]
        ks, vs = ks.repeat_interleave(G, 0), vs.repeat_interleave(G, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("fn", [moba_attn_varlen_gather, moba_attn_varlen_reference])
def test_short_sequences_equal_causal_full_attention(fn):
    # every sequence <= topk * B: all past blocks are picked, MoBA is causal attention
    B, topk = 8, 4
    q, k, v, cu = make([32, 7, 25, 30], 4, 2, seed=1)
    out = fn(q, k, v, cu, 32, B, topk)
    assert rel(out, causal_full(q, k, v, cu)) < 1e-6
    # no sequence longer than one block: nothing to pick, still causal attention
    q1, k1, v1, cu1 = make([5, 8, 3], 2, 2, seed=11)
    assert rel(fn(q1, k1, v1, cu1, 8, B, topk), causal_full(q1, k1, v1, cu1)) < 1e-6
    # and one block fewer than needed is visibly different (the test can fail)
    assert rel(fn(q, k, v, cu, 32, B, topk - 1), causal_full(q, k, v, cu)) > 1e-3


def test_topk1_is_block_diagonal_causal():
    B = 8
    q, k, v, cu = make([37, 20], 2, 1, seed=2)
    out = moba_attn_varlen(q, k, v, cu, 37, B, 1)
    # reference: every block of every sequence is its own causal sequence
    blocks = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        blocks += list(range(s, e, B)) + [e]
        blocks = sorted(set(blocks))
    cu_blk = torch.tensor(blocks, dtype=torch.int32)
    assert rel(out, causal_full(q, k, v, cu_blk)) < 1e-6


@pytest.mark.parametrize("fn", [moba_attn_varlen, moba_attn_varlen_reference])
def test_future_perturbation_leaves_past_outputs_unchanged(fn):
    B, topk = 8, 3
    lens = [61, 40]
    q, k, v, cu = make(lens, 4, 2, seed=3)
    base = fn(q, k, v, cu, 61, B, topk)
    g = torch.Generator().manual_seed(7)
    for t in (0, 7, 8, 23, 24, 45):  # positions in sequence 0, block edges included
        for which in range(3):
            x = [q.clone(), k.clone(), v.clone()]
            x[which][t + 1 : lens[0]] += 3 * torch.randn(x[which][t + 1 : lens[0]].shape, generator=g)
            out = fn(*x, cu, 61, B, topk)
            assert torch.allclose(out[: t + 1], base[: t + 1], rtol=1e-6, atol=1e-6), (t, which)
            assert torch.equal(out[lens[0]:], base[lens[0]:])  # other sequence: bit-identical
            assert (out[t + 1 : lens[0]] - base[t + 1 : lens[0]]).abs().max() > 1e-3  # the change is seen


def brute_force_picks(q, k, cu, B, topk):
    """Per query, per head: competing blocks sorted by (score desc, index asc), fp64."""
    H, G = q.shape[1], q.shape[1] // k.shape[1]
    picks = {}
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        for t in range(e - s):
            comp = [i for i in range((e - s + B - 1) // B) if (i + 1) * B <= t]
            for h in range(H):
                sc = {i: float(q[s + t, h].double() @ k[s + i * B : s + (i + 1) * B, h // G].double().mean(0))
                      for i in comp}
                picks[(s + t, h)] = sorted(sorted(comp, key=lambda i: (-sc[i], i))[: topk - 1])
    return picks


def attention_pattern(fn, k, q, cu, B, topk):
    """Weights of every (query, key) pair: v = one-hot of the key's position in its sequence."""
    T, Hkv = k.shape[0], k.shape[1]
    L = int((cu[1:] - cu[:-1]).max())
    pos = torch.cat([torch.arange(e - s) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    v = torch.zeros(T, Hkv, L, dtype=q.dtype)
    v[torch.arange(T), :, pos] = 1.0
    qpad = torch.zeros(T, q.shape[1], L, dtype=q.dtype)
    kpad = torch.zeros(T, Hkv, L, dtype=q.dtype)
    qpad[..., : q.shape[2]], kpad[..., : k.shape[2]] = q, k  # zero dims change no score
    return fn(qpad, kpad, v, cu, L, B, topk), pos


@pytest.mark.parametrize("fn", [moba_attn_varlen, moba_attn_varlen_reference])
@pytest.mark.parametrize("topk", [1, 2, 3, 5])
def test_each_query_attends_exactly_its_picked_blocks(fn, topk):
    B = 8
    q, k, _, cu = make([45, 26, 8], 2, 1, D=8, dtype=torch.float64, seed=4)
    w, pos = attention_pattern(fn, k, q, cu, B, topk)  # [T, H, L]
    picks = brute_force_picks(q, k, cu, B, topk)
    sel = moba_select_blocks(q, k, cu, B, topk)
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
    blk_first = {}
    for n, s in enumerate(cu[:-1].tolist()):
        blk_first[s] = sum((e - s_ + B - 1) // B for s_, e in zip(cu[:n].tolist(), cu[1 : n + 1].tolist()))
    for t in range(q.shape[0]):
        p = int(pos[t])
        L = int(cu[torch.searchsorted(cu, starts[t], right=True)] - starts[t])
        for h in range(q.shape[1]):
            row = w[t, h, :L]
            assert torch.all(row[p + 1 :] == 0)  # nothing from the future
            seen = sorted({j // B for j in torch.nonzero(row > 0).flatten().tolist()})
            assert len(seen) == min(topk, 1 + p // B)
            expect = sorted(picks[(t, h)] + [p // B])
            assert seen == expect, (t, h, seen, expect)
            # whole past blocks, own block up to t
            for b in seen:
                hi = min((b + 1) * B, p + 1)
                assert torch.all(row[b * B : hi] > 0)
            got = sorted(i - blk_first[int(starts[t])] for i in sel[t, h].tolist() if i >= 0)
            assert got == picks[(t, h)]


def test_packed_sequences_are_independent():
    B, topk = 8, 2
    lens = [30, 47, 12]
    q, k, v, cu = make(lens, 4, 2, seed=5)
    packed = moba_attn_varlen(q, k, v, cu, 47, B, topk)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = moba_attn_varlen(q[s:e], k[s:e], v[s:e], torch.tensor([0, e - s], dtype=torch.int32), e - s, B, topk)
        assert torch.allclose(packed[s:e], alone, rtol=1e-6, atol=1e-6)
    k2 = k.clone()
    k2[30:77] = torch.randn(47, 2, 16)  # replace sequence 1
    out = moba_attn_varlen(q, k2, v, cu, 47, B, topk)
    assert torch.equal(out[:30], packed[:30]) and torch.equal(out[77:], packed[77:])
    assert not torch.allclose(out[30:77], packed[30:77])


def tie_case():
    """20 blocks of B=4: blocks 0 and 17 hold the keys kb, blocks 1..16 and 18 hold -kb, block 19
    is random. With topk 2 a query of block 19 whose score against kb is s0 picks block 0 if
    s0 > 0 (tied with 17) and block 1 otherwise (tied with 2..16 and 18). The tied blocks lie
    more than 16 blocks apart, so a chunked top-k also meets the tie across chunks."""
    B = 4
    g = torch.Generator().manual_seed(6)
    kb = torch.randn(B, 1, 8, generator=g, dtype=torch.float64)
    blocks = [kb if i in (0, 17) else -kb for i in range(19)] + [torch.randn(B, 1, 8, generator=g, dtype=torch.float64)]
    k = torch.cat(blocks)
    q = torch.randn(20 * B, 4, 8, generator=g, dtype=torch.float64)
    want = {(t, h): 0 if float(q[t, h] @ kb[:, 0].mean(0)) > 0 else 1 for t in range(76, 80) for h in range(4)}
    return q, k, torch.tensor([0, 80], dtype=torch.int32), B, want


@pytest.mark.parametrize("fn", [moba_attn_varlen, moba_attn_varlen_reference])
def test_ties_pick_the_lower_block_index(fn):
    q, k, cu, B, want = tie_case()
    w, _ = attention_pattern(fn, k, q, cu, B, 2)
    for (t, h), b in want.items():
        past = sorted({j // B for j in torch.nonzero(w[t, h] > 0).flatten().tolist()} - {19})
        assert past == [b], (t, h, past, b)
    assert set(want.values()) == {0, 1}  # both ties are exercised


def test_dispatch_cpu_is_gather_path_and_import_has_no_triton():
    q, k, v, cu = make([20, 11], 2, 2, seed=8)
    assert torch.equal(moba_attn_varlen(q, k, v, cu, 20, 8, 2), moba_attn_varlen_gather(q, k, v, cu, 20, 8, 2))
    code = "import sys, megamod.ops; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_inputs_are_refused():
    q, k, v, cu = make([10], 3, 2)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        moba_attn_varlen(q, k, v, cu, 10, 4, 2)
    q, k, v, cu = make([10], 2, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        moba_attn_varlen(q, k, v, cu, 10, 4, 0)
