"""The single-device model: construction, init, causality, parameter counts."""

import pytest
import torch

from megamod.config import ModelConfig, load_config
from megamod.model.gpt import build_model, count_parameters
from megamod.model.rope import apply_rope, rope_tables


def _cfg(*argv):
    return load_config(None, ["--data.synthetic", "true", *argv])


# Exact counts, derived per block as 4·d² (MHA projections; GQA shrinks wk/wv) + 3·d·ffn + 2·d
# (norm gains), plus V·d input, V·d output (untied), d final norm. E.g. debug: d=128, ffn=384,
# 4 layers, V=4096: 4·(65536 + 147456 + 256) + 2·524288 + 128 = 1,901,696.
@pytest.mark.parametrize("flavour, total", [
    ("debug", 1_901_696), ("125m", 134_105_856), ("350m", 373_867_520), ("760m", 777_856_512),
    ("1b", 1_261_529_088), ("2b", 2_067_130_880),
])
def test_flavour_parameter_counts(flavour, total):
    m = ModelConfig.from_flavour(flavour)
    d, f, v, n = m.d_model, m.ffn_hidden, m.vocab_size, m.n_layers
    kv = m.n_kv_heads * m.head_dim
    expected = n * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * v * d + d
    assert count_parameters(m)["total"] == expected == total


def test_init_is_deterministic_and_seed_dependent():
    a, b = build_model(_cfg()), build_model(_cfg())
    c = build_model(_cfg(), seed=7)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name


def test_init_statistics():
    model = build_model(_cfg("--model.flavour", "125m"))
    std = model.model_cfg.init_std
    assert abs(model.layers["0"].attention.wq.weight.std().item() - std) < 0.05 * std
    resid = std / (2 * model.model_cfg.n_layers) ** 0.5  # GPT-2 residual scaling
    assert abs(model.layers["3"].feed_forward.w2.weight.std().item() - resid) < 0.05 * resid
    assert torch.all(model.layers["1"].ffn_norm.weight == 1)


def test_causal_and_batch_independent():
    model = build_model(_cfg())
    x = torch.randint(0, 4096, (3, 32))
    y = x.clone()
    y[0, 20:] = torch.randint(0, 4096, (12,))  # change the future of sequence 0
    y[2] = torch.randint(0, 4096, (32,))       # and all of sequence 2
    with torch.no_grad():
        lx, ly = model(x), model(y)
    torch.testing.assert_close(lx[0, :20], ly[0, :20], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lx[0, 20:], ly[0, 20:])
    torch.testing.assert_close(lx[1], ly[1], rtol=1e-5, atol=1e-5)


def test_gqa_and_tied_embeddings():
    model = build_model(_cfg("--model.n_kv_heads", "2", "--model.tie_embeddings", "true"))
    assert model.layers["0"].attention.wk.weight.shape == (64, 128)  # 2 kv heads · 32
    assert model.output.weight is model.tok_embeddings.weight
    n = count_parameters(model.model_cfg)
    assert n["total"] == sum(p.numel() for p in model.parameters())
    logits = model(torch.randint(0, 4096, (2, 16)))
    assert logits.shape == (2, 16, 4096)
    logits.float().pow(2).mean().backward()
    assert model.tok_embeddings.weight.grad is not None


def test_rope_uses_given_positions():
    """Relative-position property: q·k after RoPE depends only on the offset of the positions."""
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    def dot(pq, pk):
        cq, sq = rope_tables(torch.tensor([pq]), 32, 10000.0)
        ck, sk = rope_tables(torch.tensor([pk]), 32, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(dot(5, 3), dot(105, 103))
    assert not torch.allclose(dot(5, 3), dot(5, 4))
    # explicit positions equal the default arange
    model = build_model(_cfg())
    x = torch.randint(0, 4096, (1, 8))
    torch.testing.assert_close(model(x), model(x, positions=torch.arange(8)))
