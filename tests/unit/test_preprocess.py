"""tools/preprocess_data.py and tools/merge_datasets.py: outputs, bad lines, atomicity, flags."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamod.data.indexed import IndexedDataset, IndexedDatasetError
from megamod.data.preprocess import BadInputError, Progress, preprocess
from megamod.data.spm_train import SpmOptions, train_sentencepiece
from megamod.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]


TEXTS = [f"def f{i}(x):\n    return x * {i}  # the lazy dog\n" for i in range(40)] + ["", "ünï 🙂"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    return train_sentencepiece(TEXTS * 3, str(d / "tok"), SpmOptions(vocab_size=320, num_threads=1))


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def docs_of(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def expected(model: str, texts, eod: bool) -> list[list[int]]:
    """One sequence per document that has tokens; an empty document has none (no lone EOD)."""
    tok = Tokenizer(model)
    return [tok.encode(t) + ([tok.eod_id] if eod else []) for t in texts if tok.encode(t)]


def good_lines(texts) -> list[bytes]:
    return [json.dumps({"text": t, "n": i}).encode() for i, t in enumerate(texts)]


def test_tokens_match_direct_encoding(tmp_path, model):
    src = write_jsonl(tmp_path / "in.jsonl", good_lines(TEXTS))
    stats = preprocess([str(src)], str(tmp_path / "out"), model, append_eod=True, progress=False)
    assert stats.outputs == [str(tmp_path / "out_text_document")]
    assert docs_of(stats.outputs[0]) == expected(model, TEXTS, eod=True)
    assert stats.docs == len(TEXTS) and not stats.bad
    # The empty document (TEXTS[-2]) is a document of no sequence, as Megatron's tool writes it:
    # the document numbering stays the input's, and no sample ever reads a lone EOD.
    ds = IndexedDataset(stats.outputs[0])
    empty = TEXTS.index("")
    assert len(ds) == len(TEXTS) - 1 and ds.num_documents == len(TEXTS)
    assert ds.document_indices[empty] == ds.document_indices[empty + 1] == empty


def test_bad_lines_are_skipped_and_counted(tmp_path, model):
    lines = good_lines(["first doc"]) + [
        b'{"text": "unterminated',           # line 2: invalid JSON
        b'{"body": "no text key"}',          # line 3: missing key
        b'{"text": "caf\xe9"}',              # line 4: latin-1 byte, not UTF-8
        b"",                                 # line 5: blank, silently ignored
        b'{"text": 42}',                     # line 6: not a string
        b'["text"]',                         # line 7: not an object
    ] + good_lines(["last doc"])             # line 8
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    stats = preprocess([str(src)], str(tmp_path / "o"), model, progress=False)
    assert [(line, why.split(" ")[0]) for _, line, why in stats.bad] == [
        (2, "invalid"), (3, "missing"), (4, "not"), (6, "key"), (7, "a")]
    assert docs_of(stats.outputs[0]) == expected(model, ["first doc", "last doc"], eod=False)


def test_line_numbers_are_exact_across_chunks_and_workers(tmp_path, model):
    lines = good_lines(TEXTS * 20)
    bad_at = [7, 301, 302, 555, len(lines)]  # 1-based, spread over many 1 KB chunks
    for n in bad_at:
        lines[n - 1] = b"{oops"
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    s1 = preprocess([str(src)], str(tmp_path / "w1"), model, append_eod=True, chunk_bytes=1024,
                    progress=False)
    s2 = preprocess([str(src)], str(tmp_path / "w2"), model, append_eod=True, chunk_bytes=1024,
                    workers=2, progress=False)
    assert [line for _, line, _ in s1.bad] == bad_at == [line for _, line, _ in s2.bad]
    for ext in (".bin", ".idx"):  # same bytes whatever the worker count
        assert Path(s1.outputs[0] + ext).read_bytes() == Path(s2.outputs[0] + ext).read_bytes()
    assert IndexedDataset(s1.outputs[0]).num_documents == len(lines) - len(bad_at)


def test_strict_aborts_and_writes_nothing(tmp_path, model):
    src = write_jsonl(tmp_path / "in.jsonl", good_lines(TEXTS) + [b"{bad"])
    with pytest.raises(BadInputError, match=r"in\.jsonl:43: invalid JSON"):
        preprocess([str(src)], str(tmp_path / "o"), model, strict=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # not even temporary files


def test_several_keys_make_aligned_datasets(tmp_path, model):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)]
    src = write_jsonl(tmp_path / "qa.jsonl", [json.dumps(r).encode() for r in rows])
    stats = preprocess([str(src)], str(tmp_path / "qa"), model, keys=["q", "a"], progress=False)
    assert [os.path.basename(p) for p in stats.outputs] == ["qa_q_document", "qa_a_document"]
    assert docs_of(stats.outputs[1]) == expected(model, [r["a"] for r in rows], eod=False)


def test_text_files_and_directories(tmp_path, model):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second file\nline two\n")
    (d / "a.py").write_text("def first():\n    pass\n")
    (d / "sub" / "c.md").write_text("third")
    (d / "sub" / "bad.bin").write_bytes(b"\xff\xfe binary")
    (d / ".hidden").write_text("ignored")
    stats = preprocess([str(d)], str(tmp_path / "t"), model, progress=False)
    assert docs_of(stats.outputs[0]) == expected(
        model, ["def first():\n    pass\n", "second file\nline two\n", "third"], eod=False)
    assert [(Path(p).name, line) for p, line, _ in stats.bad] == [("bad.bin", 1)]
    lines = preprocess([str(d / "b.txt")], str(tmp_path / "l"), model, text_unit="line",
                       progress=False)
    assert docs_of(lines.outputs[0]) == expected(model, ["second file", "line two"], eod=False)
    with pytest.raises(ValueError, match="one field"):
        preprocess([str(d)], str(tmp_path / "x"), model, keys=["a", "b"], progress=False)


def test_progress_reports_rates():
    out = io.StringIO()
    p = Progress(total_bytes=1000, log_interval=10, stream=out)
    p.update(5, 50, 100)
    p.update(12, 120, 500)
    p.close(20, 200, 1000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith(" 50.0%") and lines[1].startswith("100.0%")
    assert "docs/s" in lines[0] and "M tokens/s" in lines[0]


def test_cli_writes_outputs_and_skip_listing(tmp_path, model, capsys, load_tool):
    src = write_jsonl(tmp_path / "in.jsonl", good_lines(TEXTS) + [b"{bad"])
    rc = load_tool("preprocess_data").main([
        "--input", str(src), "--output-prefix", str(tmp_path / "d" / "out"), "--json-keys", "text",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--append-eod",
        "--workers", "2", "--log-interval", "10"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "in.jsonl:43: invalid JSON" in err and "docs/s" in err
    assert (tmp_path / "d" / "out_skipped.tsv").read_text().splitlines()[1].endswith("\t43\tinvalid JSON "
                                                                                    "(Expecting property "
                                                                                    "name enclosed in "
                                                                                    "double quotes at "
                                                                                    "column 2)")
    assert docs_of(str(tmp_path / "d" / "out_text_document")) == expected(model, TEXTS, eod=True)


@pytest.mark.parametrize("flags, named", [
    (["--workers", "0"], "--workers"),
    (["--log-interval", "0"], "--log-interval"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type"),
    (["--tokenizer-model", "/nonexistent.model"], "--tokenizer-model"),
    (["--input", "/nonexistent.jsonl"], "--input"),
    (["--json-keys", "text", "text"], "--json-keys"),
])
def test_cli_bad_flags_are_named(tmp_path, model, capsys, flags, named, load_tool):
    src = write_jsonl(tmp_path / "in.jsonl", good_lines(["x"]))
    args = {"--input": [str(src)], "--output-prefix": [str(tmp_path / "o")],
            "--tokenizer-type": ["SentencePieceTokenizer"], "--tokenizer-model": [model]}
    args[flags[0]] = flags[1:]
    argv = [x for k, v in args.items() for x in (k, *v)]
    with pytest.raises(SystemExit) as e:
        load_tool("preprocess_data").main(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_killed_run_leaves_nothing_that_looks_valid(tmp_path, model):
    # Big enough to still be tokenizing when killed; one long-running process, SIGKILL: no cleanup.
    src = write_jsonl(tmp_path / "big.jsonl", good_lines(TEXTS * 5000))
    prefix = tmp_path / "k"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(src),
         "--output-prefix", str(prefix), "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", model, "--chunk-mb", "0.05"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob("k_text_document.bin.tmp-*")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished first
    assert not (tmp_path / "k_text_document.bin").exists()
    assert not (tmp_path / "k_text_document.idx").exists()
    with pytest.raises(IndexedDatasetError, match="no such file"):
        IndexedDataset(str(tmp_path / "k_text_document"))


def test_merge_tool(tmp_path, model, capsys, load_tool):
    a = write_jsonl(tmp_path / "a.jsonl", good_lines(TEXTS[:3]))
    b = write_jsonl(tmp_path / "b.jsonl", good_lines(TEXTS[3:5]))
    pa = preprocess([str(a)], str(tmp_path / "a"), model, progress=False).outputs[0]
    pb = preprocess([str(b)], str(tmp_path / "b"), model, progress=False).outputs[0]
    merge = load_tool("merge_datasets")
    assert merge.main(["--input", pa, pb + ".idx", "--output-prefix", str(tmp_path / "m" / "ab")]) == 0
    assert docs_of(str(tmp_path / "m" / "ab")) == docs_of(pa) + docs_of(pb)
    assert merge.main(["--input", str(tmp_path), "--output-prefix", str(tmp_path / "m" / "dir")]) == 0
    assert docs_of(str(tmp_path / "m" / "dir")) == docs_of(pa) + docs_of(pb)  # sorted: a, then b
    with open(pb + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    assert merge.main(["--input", pa, pb, "--output-prefix", str(tmp_path / "bad")]) == 1
    assert "not written together" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))
    with pytest.raises(SystemExit):
        merge.main(["--input", str(tmp_path / "nothing"), "--output-prefix", str(tmp_path / "x")])
    assert "--input" in capsys.readouterr().err


def test_byte_order_mark_is_not_content(tmp_path, model):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b"".join(line + b"\n" for line in good_lines(["a", "b"])))
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbfhello")
    s = preprocess([str(src), str(txt)], str(tmp_path / "o"), model, progress=False)
    assert not s.bad
    assert docs_of(s.outputs[0]) == expected(model, ["a", "b", "hello"], eod=False)
