"""MoBA inside the model: MoD-routed blocks run it over the compacted sequence, gate metrics for
TensorBoard, and KV-cache decoding that equals a full forward."""

import pytest
import torch

from megamod.config import load_config
from megamod.infer.generate import sample
from megamod.model.kv_cache import KVCache
from megamod.model.attention import MobaAttention
from megamod.model.gpt import build_model
from megamod.model.mod import RoutedBlock, capacity_tokens, routing, topk_positions
from megamod.model.rope import apply_rope, rope_tables
from megamod.ops.moba import moba_attn_varlen_reference


def _model(*argv, seed=3):
    # GQA (4 query heads, 2 kv heads); MoBA blocks of 4 tokens, own block + 1 past block
    cfg = load_config(None, ["--data.synthetic", "true", "--model.d_model", "64", "--model.n_heads", "4",
                             "--model.n_kv_heads", "2", "--model.ffn_hidden", "128", "--model.vocab_size", "256",
                             "--model.attention", "moba", "--moba.chunk_size", "4", "--moba.topk", "2", *argv])
    return build_model(cfg, seed=seed).eval(), cfg


@torch.no_grad()
def test_routed_block_runs_moba_over_the_compacted_sequence():
    """RoutedBlock(MoBA) == an independent recomputation: top-k tokens, RoPE at their original
    positions, the dense masked MoBA reference over the k compacted tokens, g(r)·f scattered back."""
    model, cfg = _model("--mod.enabled", "true", "--mod.capacity", "0.5")
    blk = model.layers["1"]
    assert isinstance(blk, RoutedBlock) and isinstance(blk.attention.inner, MobaAttention)
    b, s, d, hd = 2, 32, 64, cfg.model.head_dim
    x = torch.randn(b, s, d)
    cos, sin = rope_tables(torch.arange(s), hd, cfg.model.rope_theta)
    got = blk(x, cos, sin)

    r = blk.router(x)[..., 0].float()
    idx = topk_positions(r, capacity_tokens(0.5, s))  # (B, 16): spans 4 MoBA blocks of 4
    xs = x.gather(1, idx[..., None].expand(-1, -1, d))
    a_in = blk.attention_norm(xs)
    att = blk.attention
    q = apply_rope(att.wq(a_in).view(b, 16, -1, hd), cos[idx], sin[idx])
    k = apply_rope(att.wk(a_in).view(b, 16, -1, hd), cos[idx], sin[idx])
    v = att.wv(a_in).view(b, 16, -1, hd)
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    o = moba_attn_varlen_reference(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, 16, 4, 2)
    a = att.wo(o.view(b, 16, -1))
    f = a + blk.feed_forward(blk.ffn_norm(xs + a))
    want = x.clone()
    want.scatter_add_(1, idx[..., None].expand(-1, -1, d), r.gather(1, idx)[..., None] * f)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and MoBA really is sparse here (dense causal over the 16 tokens differs)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    assert not torch.allclose(dense, o.view(b, 16, -1, hd), atol=1e-4)


def test_gate_metrics_on_a_hand_made_case():
    """chunk 2, topk 2, one head, D = 1. Key blocks: means 1, 3, 5 (last one partial-free).
    t=0,1: own block only. t=2,3: own + block 0 (the only competitor: dist 1, no margin).
    t=4 (q=+1): scores 1, 3 -> block 1 (dist 1), margin 2. t=5 (q=-2): scores -2, -6 -> block 0
    (dist 2), margin 4. Selections: 6 own, 3 at dist 1, 1 at dist 2."""
    m = MobaAttention(chunk_size=2, topk=2, metrics_every=2, metrics_queries=32).train()
    k = torch.tensor([1.0, 1.0, 3.0, 3.0, 5.0, 5.0]).view(1, 6, 1, 1)
    q = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -2.0]).view(1, 6, 1, 1)
    v = torch.randn(1, 6, 1, 1)
    assert m.log_metrics() == {}
    m(q, k, v)
    m(q * 100, k, v)  # not sampled (every 2nd call)
    got = m.log_metrics()
    assert got["gate_margin"] == pytest.approx(3.0)
    want = {"dist_0": 0.6, "dist_1": 0.3, "dist_2": 0.1}
    for dd in range(MobaAttention.DIST_CAP + 1):
        key = f"dist_{dd}" + ("+" if dd == MobaAttention.DIST_CAP else "")
        assert got[key] == pytest.approx(want.get(key, 0.0)), key
    assert m.log_metrics() == {}  # popped
    m.eval()(q, k, v)  # eval forwards are not recorded
    assert m.log_metrics() == {}
    # the "8+" bucket: chunk 1, keys rising so the nearest past block always wins except q < 0
    m = MobaAttention(chunk_size=1, topk=2, metrics_every=1).train()
    s = 12
    k = torch.arange(s, dtype=torch.float32).view(1, s, 1, 1)
    m(-torch.ones(1, s, 1, 1), k, torch.zeros(1, s, 1, 1))  # q < 0: block 0 (key 0) wins
    got = m.log_metrics()
    # t=1..11 pick block 0 at distance t: 1..7 once each, 8+ for t = 8..11 (4 picks); 12 own
    assert got["dist_8+"] == pytest.approx(4 / 23) and got["dist_3"] == pytest.approx(1 / 23)
    assert got["gate_margin"] == pytest.approx(1.0)  # -0 - (-1), where t >= 2


@pytest.mark.parametrize("mod", [False, True])
@torch.no_grad()
def test_moba_cached_decoding_equals_full_forward(mod):
    """4 layers, the last dense (hybrid); with MoD, blocks 1 and 3 route causally (ragged caches).
    Prefill + token-by-token decoding == one full forward, fp32, rtol 1e-5; and the selection
    matters (a cache that treats MoBA layers as dense disagrees)."""
    extra = ["--mod.enabled", "true", "--mod.capacity", "0.5"] if mod else []
    model, cfg = _model("--moba.full_attention_layers", "-1", *extra)
    assert [type(model.layers[str(i)].attention.inner).__name__ for i in range(4)][-1] == "SDPAttention"
    tokens = torch.randint(0, 256, (2, 29))
    with routing(model, "causal"):
        full = model(tokens)
        for prefill in (1, 11):
            cache = KVCache.for_model(model, batch_size=2, max_len=29)
            assert sorted(cache.moba) == [0, 1, 2]
            outs = [model(tokens[:, :prefill], positions=torch.arange(prefill), cache=cache)]
            outs += [model(tokens[:, t:t + 1], positions=torch.tensor([t]), cache=cache) for t in range(prefill, 29)]
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
        plain = KVCache(batch_size=2, max_len=29)
        wrong = torch.cat([model(tokens[:, t:t + 1], positions=torch.tensor([t]), cache=plain) for t in range(29)], 1)
    assert not torch.allclose(wrong, full, atol=1e-4)
    if mod:
        lengths = cache.lengths()
        assert lengths[0] == [29, 29] and all(0 < n < 29 for n in lengths[1] + lengths[3])


@torch.no_grad()
def test_greedy_sample_with_moba_uses_the_cache_and_equals_rerunning_the_prefix(monkeypatch):
    model, _ = _model()
    prompt = torch.randint(0, 256, (7,)).tolist()
    lens = []
    fwd = model.forward
    monkeypatch.setattr(model, "forward", lambda tok, *a, **kw: (lens.append(tok.shape[1]), fwd(tok, *a, **kw))[1])
    got = sample(model, prompt, max_new_tokens=12, temperature=0)
    assert lens == [7] + [1] * 11  # prefill once, then one token a step (no prefix re-runs)
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(fwd(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[7:]


@torch.no_grad()
def test_moba_decoding_gathers_at_most_topk_blocks(monkeypatch):
    """Token-by-token decoding of 28 tokens (7 blocks of 4; topk 3, so at most 12 keys a query):
    every decode step's attention gets key tensors of at most topk · chunk = 12 keys, however
    long the cache, and each query head attends to exactly its own block's entries up to itself
    plus chunk keys per selected past block (min(topk - 1, blocks before it)); the logits equal
    a full forward's at every position (fp32, 1e-5)."""
    import megamod.model.kv_cache as kv

    model, cfg = _model("--moba.topk", "3")
    chunk, topk, n = 4, 3, 28
    tokens = torch.randint(0, 256, (2, n))
    full = model(tokens)
    key_lengths = []
    sdpa = kv.F.scaled_dot_product_attention
    monkeypatch.setattr(kv.F, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: (key_lengths.append(k.shape[-2]), sdpa(q, k, *a, **kw))[1])
    cache = KVCache.for_model(model, batch_size=2, max_len=n)
    outs = [model(tokens[:, :1], positions=torch.arange(1), cache=cache)]
    for t in range(1, n):
        outs.append(model(tokens[:, t:t + 1], positions=torch.tensor([t]), cache=cache))
        own = t // chunk
        want = t % chunk + 1 + chunk * min(topk - 1, own)
        for layer in cache.layers.values():
            assert layer.attended.shape == (2, 1, 4)
            assert (layer.attended == want).all(), (t, layer.attended, want)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert len(key_lengths) == cfg.model.n_layers * (n - 1)  # one attention call per layer and step, none on prefill
    assert max(key_lengths) <= topk * chunk < n
    assert cache.lengths()[0] == [n, n]
