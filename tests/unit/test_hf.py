"""Hugging Face export and import (megamod/infer/hf_*.py, tools/convert_to_hf.py, convert_from_hf.py).

Checkpoints here are weights-only ones (train/checkpoint.py ``save_weights``: what
convert_from_hf writes, read by load_model like any other); checkpoints of real training runs on
other grids are exported in tests/distributed/test_pp_train.py. Tolerances: fp32 logits 1e-5 —
the two implementations differ only in summation order (measured: ~5e-7).
"""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

import megamod
from megamod.config import load_config
from megamod.data.spm_train import SpmOptions, split_sentences, train_sentencepiece
from megamod.infer.generate import generate
from megamod.model.gpt import build_model
from megamod.train.checkpoint import save_weights

VOCAB = 512


@pytest.fixture(scope="module")
def documents():
    """100 documents of the running interpreter's standard library (sources and docstrings), cut
    to 2,000 characters, one of them with non-ASCII text, whitespace runs and the EOD piece."""
    from megamod.data.corpus import iter_stdlib_documents

    docs = [d["text"][:2000] for d in itertools.islice(iter_stdlib_documents(), 0, 1500, 15)]
    docs[7] += "\nünïcödé 日本語 🙂 \x00 <|endoftext|> x  \t\n    y 12345"
    assert len(docs) == 100
    return docs


@pytest.fixture(scope="module")
def spm_models(documents, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spm")
    sentences = [s for d in documents for s in split_sentences(d, 2048)]
    return {kind: train_sentencepiece(sentences, str(tmp / kind), SpmOptions(vocab_size=VOCAB, model_type=kind,
                                                                             num_threads=1))
            for kind in ("bpe", "unigram")}


def _run(tmp_path, spm_path, *flags, seed=0):
    cfg = load_config(None, ["--data.synthetic", "true", "--model.d_model", "64", "--model.n_layers", "2",
                             "--model.n_heads", "4", "--model.ffn_hidden", "128", "--model.vocab_size", str(VOCAB),
                             "--model.rope_theta", "50000", "--data.tokenizer_model", spm_path, *flags])
    run = tmp_path / "run"
    save_weights(str(run / "checkpoints"), build_model(cfg, seed=seed).state_dict(), cfg.to_dict())
    return run


@pytest.mark.parametrize("kv_heads, tied", [(4, False), (2, True), (4, True), (1, False)],
                         ids=["mha-untied", "gqa-tied", "mha-tied", "mqa-untied"])
def test_export_loads_in_transformers_with_our_logits_and_greedy_tokens(tmp_path, load_tool, spm_models,
                                                                         kv_heads, tied):
    from transformers import AutoModelForCausalLM

    run = _run(tmp_path, spm_models["bpe"], "--model.n_kv_heads", str(kv_heads),
               "--model.tie_embeddings", str(tied).lower())
    out = tmp_path / "hf"
    # 0.0002 GiB shards: ~215 KB, so the model's ~0.7 MB spreads over several files and the index
    assert load_tool("convert_to_hf").main(["--run-dir", str(run), "--output", str(out), "--max-shard-size",
                                            "0.0002"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["tie_word_embeddings"], config["eos_token_id"]) == (kv_heads, tied, 4)

    ours, _ = megamod.load_model(str(run))
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
    prompt = tokens[0, :9]
    hf_ids = theirs.generate(prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 9:].tolist()
    assert len(hf_ids) == 20
    assert generate(ours, [prompt.tolist()], 20, temperature=0).tokens[0] == hf_ids


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_gives_sentencepiece_ids_on_100_documents(tmp_path, spm_models, documents, kind):
    from transformers import AutoTokenizer

    from megamod.data.tokenizer import Tokenizer
    from megamod.infer.hf_tokenizer import check_ids, save_hf_tokenizer

    ids = save_hf_tokenizer(spm_models[kind], str(tmp_path))
    check_ids(str(tmp_path), spm_models[kind], documents)  # raises at the first difference
    hf, sp = AutoTokenizer.from_pretrained(str(tmp_path)), Tokenizer(spm_models[kind])
    # transformers 5 merged LlamaTokenizerFast into LlamaTokenizer; unigram: the generic class (hf_tokenizer.py)
    assert type(hf).__name__ in (("LlamaTokenizerFast", "LlamaTokenizer") if kind == "bpe" else ("PreTrainedTokenizerFast",
                                                                                                 "TokenizersBackend"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ids["bos"], sp.eod_id, sp.pad_id) == (1, 4, 3)
    assert hf("x y")["input_ids"] == sp.encode("x y")  # no BOS, no dummy-prefix space
    assert sum(len(hf(d)["input_ids"]) for d in documents) == sum(len(sp.encode(d)) for d in documents) > 10_000


def test_hf_to_megamod_to_hf_is_bit_identical(tmp_path, load_tool, spm_models):
    """A bf16 HF Llama (GQA, untied, rope_theta 5e5) -> megamod -> HF: every tensor equal bit for
    bit, same names and dtype; the converted run loads with HF's logits; and it starts training
    (tests/integration/test_hf_train.py runs the trainer on one)."""
    import shutil

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
    src = tmp_path / "src"
    LlamaForCausalLM(hf_cfg).to(torch.bfloat16).save_pretrained(str(src))
    shutil.copyfile(spm_models["bpe"], src / "tokenizer.model")
    run, back = tmp_path / "megamod", tmp_path / "back"
    assert load_tool("convert_from_hf").main(["--hf", str(src), "--output", str(run)]) == 0
    assert load_tool("convert_to_hf").main(["--run-dir", str(run), "--output", str(back)]) == 0  # verified

    def tensors(d):
        return {k: v for f in sorted(os.listdir(d)) if f.endswith(".safetensors") for k, v in load_file(d / f).items()}

    a, b = tensors(src), tensors(back)
    assert sorted(a) == sorted(b) and len(a) == 2 + 2 * 9 + 1
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.bfloat16, name
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name  # the bits
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "vocab_size", "rope_parameters"):
        assert ca.get(key) == cb.get(key), key
    model, cfg = megamod.load_model(str(run))
    assert (cfg.model.n_kv_heads, cfg.model.rope_theta, cfg.data.tokenizer_model) == (2, 5e5, str(run / "tokenizer.model"))
    tokens = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32)(tokens).logits
        torch.testing.assert_close(model(tokens), ref, rtol=0, atol=1e-5)
    assert megamod.load_tokenizer(str(run)).model_path == str(run / "tokenizer.model")
    # weights that do not fit their config.json are refused before anything is written
    ca["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(ca))
    assert load_tool("convert_from_hf").main(["--hf", str(src), "--output", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flags, what", [
    (["--mod.enabled", "true"], "Mixture-of-Depths blocks [1, 3]"),
    (["--model.attention", "moba", "--moba.full_attention_layers", "-1"], "MoBA layers [0, 1, 2]"),
])
def test_mod_and_moba_exports_are_refused_with_the_reason(tmp_path, load_tool, spm_models, capsys, flags, what):
    run = _run(tmp_path, spm_models["bpe"], "--model.n_layers", "4", *flags)
    out = tmp_path / "hf"
    assert load_tool("convert_to_hf").main(["--run-dir", str(run), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot export to Hugging Face LlamaForCausalLM" in err and what in err and "README" in err
    assert not out.exists()  # refused before anything is written


def test_moba_with_every_layer_dense_is_a_dense_model(tmp_path, load_tool, spm_models):
    run = _run(tmp_path, spm_models["bpe"], "--model.attention", "moba", "--moba.full_attention_layers", "0", "1")
    assert load_tool("convert_to_hf").main(["--run-dir", str(run), "--output", str(tmp_path / "hf"),
                                            "--no-tokenizer"]) == 0


@pytest.mark.parametrize("field, value, named", [
    ("attention_bias", True, "attention_bias=True"), ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope scaling"), ("head_dim", 32, "head_dim=32"),
])
def test_import_refuses_what_megamod_cannot_compute(field, value, named):
    from megamod.infer.hf_export import ExportError
    from megamod.infer.hf_import import model_config_from_hf

    base = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 96}
    assert model_config_from_hf(base).head_dim == 16
    with pytest.raises(ExportError, match=named.replace("[", r"\[")):
        model_config_from_hf({**base, field: value})
