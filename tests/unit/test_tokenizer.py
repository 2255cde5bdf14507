"""Tokenizer training (tools/train_tokenizer.py) and the Tokenizer wrapper, on tiny corpora."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from megamod.data.spm_train import reservoir_sample, split_sentences
from megamod.data.tokenizer import EOD_PIECE, Tokenizer



def tiny_corpus(path: Path, n_docs: int = 60) -> Path:
    docs = []
    for i in range(n_docs):
        code = (f"def handler_{i}(event, context):\n"
                f"    \"\"\"Handle event number {i} and return its size.\"\"\"\n"
                f"    if event is None:\n        return {i}\n"
                f"    return len(event) + {i * 7}\n")
        prose = f"The quick brown fox {i} jumps over the lazy dog; parsing tokens is fun.\n"
        docs.append({"text": code + prose, "id": i})
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def train(load_tool, tmp_path: Path, *extra: str, vocab: int = 400) -> Tokenizer:
    corpus = tiny_corpus(tmp_path / "corpus.jsonl")
    prefix = tmp_path / "tok"
    rc = load_tool("train_tokenizer").main(
        ["--input", str(corpus), "--model-prefix", str(prefix), "--vocab-size", str(vocab),
         "--num-threads", "1", *extra])
    assert rc == 0
    return Tokenizer(str(prefix) + ".model")


@pytest.fixture(scope="module")
def tok(tmp_path_factory, load_tool):
    return train(load_tool, tmp_path_factory.mktemp("tok"))


def test_special_ids(tok):
    assert tok.vocab_size == 400
    assert tok.id_to_piece(tok.eod_id) == EOD_PIECE
    assert tok.pad_id == 3 and tok.id_to_piece(tok.pad_id) == "<pad>"
    assert len({tok.eod_id, tok.pad_id}) == 2


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x\n\n\n        indented\ttab",  # whitespace is syntax in code
    "  leading and trailing spaces  ",
    "unseen: ünïcödé 日本語 🙂 \x00",  # only byte fallback can spell these
    "",
])
def test_decode_encode_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_eod_piece_is_one_token(tok):
    ids = tok.encode(f"return 1{EOD_PIECE}def")
    assert ids.count(tok.eod_id) == 1


def test_newline_runs_are_learned(tok):
    # Training sentences keep their newlines, so a frequent "\n    " is not spelled byte by byte.
    ids = tok.encode("    if event is None:\n        return 5\n")
    assert len(ids) < 14
    assert "<0x0A>" not in [tok.id_to_piece(i) for i in ids]


def test_batch_encode_matches(tok):
    texts = ["def a():\n    pass\n", "the lazy dog", ""]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_pickles_by_path(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("the quick fox") == tok.encode("the quick fox")


def test_unigram_and_no_pad(tmp_path, load_tool):
    t = train(load_tool, tmp_path, "--model-type", "unigram", "--no-pad", "--special-tokens", "<|user|>",
              vocab=320)
    assert t.pad_id == t.eod_id  # no pad piece: pad with EOD
    assert len(t.encode("<|user|>")) == 1
    assert t.decode(t.encode("def handler_3(event):\n")) == "def handler_3(event):\n"


def test_too_small_vocab_names_the_flag(tmp_path, capsys, load_tool):
    with pytest.raises(SystemExit):
        train(load_tool, tmp_path, vocab=100)
    assert "--vocab-size" in capsys.readouterr().err


def test_vocab_too_large_for_corpus_is_a_clear_error(tmp_path, capsys, load_tool):
    corpus = tmp_path / "c.txt"
    corpus.write_text("ab ab ab\n")
    rc = load_tool("train_tokenizer").main(
        ["--input", str(corpus), "--model-prefix", str(tmp_path / "t"), "--vocab-size", "5000",
         "--no-byte-fallback"])
    assert rc == 2
    assert "--vocab-size 5000" in capsys.readouterr().err
    assert not list(tmp_path.glob("t*"))  # no half-written model


def test_missing_input_names_the_flag(tmp_path, capsys, load_tool):
    with pytest.raises(SystemExit):
        load_tool("train_tokenizer").main(["--input", str(tmp_path / "nope.jsonl"),
                                           "--model-prefix", str(tmp_path / "t")])
    assert "--input" in capsys.readouterr().err


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(str(junk))


def test_split_sentences_bounds_and_keeps_text():
    text = "short line\n" * 50 + "x" * 100 + "\nend"
    pieces = list(split_sentences(text, 64))
    assert all(len(p.encode()) <= 64 for p in pieces)
    assert "".join(pieces) == text  # nothing lost when no line needs cutting mid-character
    assert list(split_sentences("\n\n   \n", 64)) == []


def test_reservoir_sample_is_bounded_seeded_and_uniform():
    sample, n = reservoir_sample(map(str, range(10_000)), 100, seed=1)
    assert n == 10_000 and len(sample) == 100 and len(set(sample)) == 100
    assert reservoir_sample(map(str, range(10_000)), 100, seed=1)[0] == sample
    assert reservoir_sample(map(str, range(10_000)), 100, seed=2)[0] != sample
    # Uniform: about half the sample comes from each half of the stream (binomial sd = 5).
    assert 30 <= sum(int(s) < 5000 for s in sample) <= 70
    assert reservoir_sample(["a", "b"], 100, seed=0) == (["a", "b"], 2)
