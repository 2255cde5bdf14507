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


@pytest.mark.parametrize("kind", ["dense", "mod", "moba", "mod_moba"])
@torch.no_grad()
def test_batched_ragged_prompts_decode_as_each_prompt_alone(kind):
    """Three prompts of 5, 11 and 8 tokens, right-padded into one prefill (padding writes no cache
    entry) and decoded together, give each prompt's greedy tokens decoded alone; MoD routes
    every row causally (ragged caches per row), MoBA (blocks of 4) gates per row."""
    from megamod.infer.generate import generate

    extra = {"dense": [], "mod": ["--mod.enabled", "true", "--mod.capacity", "0.5"],
             "moba": ["--model.attention", "moba", "--moba.chunk_size", "4", "--moba.topk", "2"]}
    extra["mod_moba"] = extra["mod"] + extra["moba"]
    model, _ = _model(*extra[kind])
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 11, 8)]
    got = generate(model, prompts, max_new_tokens=10, temperature=0)
    assert got.tokens == [sample(model, p, 10, temperature=0) for p in prompts]
    assert got.steps == 9 and got.prompt_tokens == 24 and got.ttft_s > 0 and got.decode_tokens_per_s > 0


def test_top_k_and_top_p_cut_the_distribution():
    from megamod.infer.generate import pick

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(4000, 4)  # probs 0.64, 0.24, 0.09, 0.03
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(pick(logits, 0.0), torch.zeros(4000, 1, dtype=torch.long))  # greedy
    counts = lambda ids: torch.bincount(ids.flatten(), minlength=4).tolist()  # noqa: E731
    # top_p 0.7: 0.64 alone falls short, 0.64 + 0.24 reaches it, so ids 0 and 1 stay
    top_p = counts(pick(logits, 1.0, top_p=0.7, generator=gen))
    assert top_p[2:] == [0, 0] and min(top_p[:2]) > 0
    assert abs(top_p[0] / 4000 - 0.64 / 0.88) < 0.03  # renormalised over what stays
    top_k = counts(pick(logits, 1.0, top_k=3, generator=gen))
    assert top_k[3] == 0 and min(top_k[:3]) > 0
    assert counts(pick(logits, 1.0, top_p=0.5, generator=gen)) == [4000, 0, 0, 0]  # the top id always stays


def test_generate_cli_batches_prompts_and_reports_speed(tmp_path, capsys):
    """megamod-generate on a checkpoint: one JSON line per prompt (a batch of two), greedy (so the
    completion is what ``sample`` gives), then the time to first token and the decode rate."""
    import json

    from megamod.data.spm_train import SpmOptions, train_sentencepiece
    from megamod.data.tokenizer import Tokenizer
    from megamod.infer.generate import main
    from megamod.train.checkpoint import save_weights

    text = [f"def f{i}(x):\n    return x * {i}\n" for i in range(30)]
    spm = train_sentencepiece(text, str(tmp_path / "tok"), SpmOptions(vocab_size=300, num_threads=1))
    model, cfg = _model("--data.tokenizer_model", spm, "--model.vocab_size", "320")
    save_weights(str(tmp_path / "run" / "checkpoints"), model.state_dict(), cfg.to_dict())
    assert main(["--run-dir", str(tmp_path / "run"), "--prompt", "def f", "--prompt", "return x *",
                 "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    tok = Tokenizer(spm)
    assert [r["prompt"] for r in rows] == ["def f", "return x *"]
    for r in rows:
        want = sample(model, tok.encode(r["prompt"]), 6, temperature=0, eod_id=tok.eod_id)
        assert r["completion"] == tok.decode(want)
    assert "batch 2" in out.err and "time to first token" in out.err and "tokens/s" in out.err
