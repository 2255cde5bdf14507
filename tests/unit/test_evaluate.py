"""megamod-eval (megamod/infer/evaluate.py): loss, perplexity and bits per byte of a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megamod.config import load_config
from megamod.data.indexed import IndexedDatasetBuilder
from megamod.data.spm_train import SpmOptions, split_sentences, train_sentencepiece
from megamod.data.tokenizer import Tokenizer
from megamod.infer.evaluate import main, piece_bytes
from megamod.model.gpt import build_model
from megamod.model.mod import routing
from megamod.train.checkpoint import save_weights

DOCS = [f"def handler_{i}(event):\n    return len(event) + {i * 7}  # size\n" for i in range(8)]
DOCS += ["ünïcödé 日本語 🙂 — byte fallback spells these", "  indented\n\ttabbed\n"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    spm = train_sentencepiece([s for d in DOCS * 4 for s in split_sentences(d, 2048)], str(tmp / "tok"),
                              SpmOptions(vocab_size=400, character_coverage=0.98, num_threads=1))
    cfg = load_config(None, ["--data.synthetic", "true", "--model.d_model", "64", "--model.n_layers", "2",
                             "--model.n_heads", "4", "--model.n_kv_heads", "2", "--model.ffn_hidden", "128",
                             "--model.vocab_size", "420", "--data.tokenizer_model", spm, "--mod.enabled", "true",
                             "--mod.capacity", "0.5"])
    model = build_model(cfg, seed=2).eval()
    save_weights(str(tmp / "run" / "checkpoints"), model.state_dict(), cfg.to_dict())
    tok = Tokenizer(spm)
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    with IndexedDatasetBuilder(str(tmp / "docs_text_document")) as b:
        for d in DOCS:
            b.add_document(tok.encode(d) + [tok.eod_id])
        b.finalize()
    stream = torch.tensor([t for d in DOCS for t in tok.encode(d) + [tok.eod_id]])
    return tmp, model, tok, stream


def _eval(capsys, tmp, *flags):
    assert main(["--run-dir", str(tmp / "run"), *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_piece_bytes_add_up_to_the_decoded_text(setup):
    _, _, tok, _ = setup
    table = piece_bytes(tok, 420)
    for d in DOCS:
        ids = tok.encode(d)
        assert int(table[ids].sum()) == len(d.encode("utf-8")), d
    assert table[tok.eod_id] == 0 and table[400:].sum() == 0
    assert any(tok.id_to_piece(i).startswith("<0x") for d in DOCS for i in tok.encode(d))  # byte pieces counted


@torch.no_grad()
def test_loss_ppl_and_bits_per_byte_on_jsonl_and_bin_idx(setup, capsys):
    """One window holding the whole stream: loss is plain next-token cross-entropy over it, with
    top-k and with causal routing (a MoD model); bits per byte divide its sum by the text's bytes
    less those of the first token (never predicted). The .bin/.idx copy gives the same numbers."""
    tmp, model, tok, stream = setup
    n = len(stream)
    got = _eval(capsys, tmp, "--data", str(tmp / "docs.jsonl"), "--seq-len", "1024")
    ref = F.cross_entropy(model(stream[None, :-1])[0], stream[1:]).item()
    with routing(model, "causal"):
        ref_causal = F.cross_entropy(model(stream[None, :-1])[0], stream[1:]).item()
    nbytes = len("".join(DOCS).encode()) - len(tok.decode(stream[:1].tolist()).encode())
    assert got["tokens"] == n - 1 and got["bytes"] == nbytes
    assert got["loss"] == pytest.approx(ref, rel=1e-6) and got["ppl"] == pytest.approx(math.exp(ref), rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(ref * (n - 1) / math.log(2) / nbytes, rel=1e-6)
    assert got["loss_causal"] == pytest.approx(ref_causal, rel=1e-6) and got["loss_causal"] != got["loss"]
    assert _eval(capsys, tmp, "--data", str(tmp / "docs_text_document"), "--seq-len", "1024") == \
        {**got, "data": str(tmp / "docs_text_document")}
    # windows of 16 (+1) overlapping by one, the last shorter: every token but the first once
    short = _eval(capsys, tmp, "--data", str(tmp / "docs_text_document.bin"), "--seq-len", "16", "--batch-size", "3")
    assert (short["tokens"], short["bytes"]) == (n - 1, nbytes) and (n - 1) % 16
    assert short["loss"] > got["loss"]  # less context per prediction


def test_bad_data_is_one_line(setup, capsys):
    tmp, *_ = setup
    (tmp / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SystemExit) as e:
        main(["--run-dir", str(tmp / "run"), "--data", str(tmp / "bad.jsonl")])
    assert e.value.code == 2 and "bad.jsonl:1: not a JSON object with a 'text' field" in capsys.readouterr().err
