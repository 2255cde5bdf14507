"""Incremental decoding with the KV cache equals full forwards; MoD routes causally while decoding."""

import pytest
import torch

from megamod.config import load_config
from megamod.infer.generate import sample
from megamod.model.kv_cache import KVCache
from megamod.model.gpt import build_model
from megamod.model.mod import routed_layers, routing


def _model(*argv, seed=3):
    # small debug model with GQA (4 query heads, 2 kv heads) so the cache path's GQA is exercised
    cfg = load_config(None, ["--data.synthetic", "true", "--model.d_model", "64", "--model.n_heads", "4",
                             "--model.n_kv_heads", "2", "--model.ffn_hidden", "128", "--model.vocab_size", "256",
                             *argv])
    return build_model(cfg, seed=seed).eval(), cfg


def _decode_one_by_one(model, tokens, cache, start=0):
    """Logits of tokens[:, start:], fed one position at a time through the cache."""
    return torch.cat([model(tokens[:, t:t + 1], positions=torch.tensor([t]), cache=cache)
                      for t in range(start, tokens.shape[1])], 1)


@torch.no_grad()
def test_dense_cached_decoding_equals_full_forward():
    model, _ = _model()
    tokens = torch.randint(0, 256, (2, 24))
    full = model(tokens)
    cache = KVCache(batch_size=2, max_len=24)
    steps = _decode_one_by_one(model, tokens, cache)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    assert cache.lengths() == {i: [24, 24] for i in range(4)}
    # prefill 10 tokens at once, then 14 single steps
    cache = KVCache(batch_size=2, max_len=24)
    pre = model(tokens[:, :10], positions=torch.arange(10), cache=cache)
    rest = _decode_one_by_one(model, tokens, cache, start=10)
    torch.testing.assert_close(torch.cat([pre, rest], 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("predictor", ["true", "false"])
@torch.no_grad()
def test_mod_prefill_with_causal_routing_equals_token_by_token_decoding(predictor):
    """Routed blocks 1, 2, 3 (every 1). A prefill forward with causal routing (no cache) and
    decoding one token at a time through the cache give the same logits, and a routed layer's
    cache holds only the tokens routed into it. Two sequences route differently (ragged appends)."""
    model, cfg = _model("--mod.enabled", "true", "--mod.every", "1", "--mod.predictor", predictor,
                        "--mod.capacity", "0.5")
    tokens = torch.randint(0, 256, (2, 24))
    with routing(model, "causal"):
        full = model(tokens)
        cache = KVCache(batch_size=2, max_len=24)
        steps = _decode_one_by_one(model, tokens, cache)
        cache2 = KVCache(batch_size=2, max_len=24)
        pre = model(tokens[:, :9], positions=torch.arange(9), cache=cache2)
        rest = _decode_one_by_one(model, tokens, cache2, start=9)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([pre, rest], 1), full, rtol=1e-5, atol=1e-5)
    lengths = cache.lengths()
    assert lengths[0] == [24, 24]  # dense block: every token
    routed = [n for i in routed_layers(cfg) for n in lengths[i]]
    assert all(0 < n < 24 for n in routed), lengths  # skipped tokens wrote nothing
    assert lengths[1][0] != lengths[1][1] or lengths[2][0] != lengths[2][1] or lengths[3][0] != lengths[3][1]
    assert cache2.lengths() == lengths


@torch.no_grad()
def test_greedy_sample_equals_rerunning_the_prefix():
    model, _ = _model("--mod.enabled", "true", "--mod.capacity", "0.5")
    prompt = torch.randint(0, 256, (7,)).tolist()
    got = sample(model, prompt, max_new_tokens=12, temperature=0)
    ids = list(prompt)
    with routing(model, "causal"):
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[7:]
    assert all(b.routing_mode == "topk" for b in (model.layers["1"], model.layers["3"]))  # restored


def test_topk_routing_refuses_the_cache():
    model, _ = _model("--mod.enabled", "true")
    with pytest.raises(RuntimeError, match="causal routing"):
        model(torch.randint(0, 256, (1, 4)), positions=torch.arange(4), cache=KVCache(1, 8))
