"""The demo corpus: the running interpreter's standard library, deterministic."""

from __future__ import annotations

import json

import pytest

from megamod.data.corpus import iter_stdlib_documents, main, module_doc_text, write_stdlib_corpus


def test_written_corpus_is_deterministic_and_sorted(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert write_stdlib_corpus(str(a), max_docs=40) == 40
    assert write_stdlib_corpus(str(b), max_docs=40) == 40
    assert a.read_bytes() == b.read_bytes()
    docs = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    paths = [d["path"] for d in docs]
    assert paths == sorted(paths) and all(p.endswith(".py") for p in paths)
    assert all(set(d) == {"text", "path"} and isinstance(d["text"], str) for d in docs)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_sources_then_builtin_docstrings():
    docs = list(iter_stdlib_documents())
    paths = [d["path"] for d in docs]
    assert "json/decoder.py" in paths and "os.py" in paths
    assert not any("site-packages" in p or "__pycache__" in p for p in paths)
    builtin = [p for p in paths if p.startswith("<builtin>/")]
    assert "<builtin>/sys" in builtin and builtin == sorted(builtin)
    assert paths.index(builtin[0]) == len(paths) - len(builtin)  # all after the sources
    sys_doc = next(d["text"] for d in docs if d["path"] == "<builtin>/sys")
    assert sys_doc.startswith("Module sys\n") and "getrecursionlimit()" in sys_doc
    assert " at 0x" not in sys_doc  # no reprs, so no addresses that change between runs


def test_module_doc_text_is_stable():
    assert module_doc_text("math") == module_doc_text("math")
    assert module_doc_text("no_such_module_xyz") is None


def test_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "c.jsonl"
    assert main(["--output", str(out), "--max-docs", "3"]) == 0
    assert len(out.read_text().splitlines()) == 3
    with pytest.raises(SystemExit):
        main(["--output", str(out), "--max-docs", "-1"])
    assert "--max-docs" in capsys.readouterr().err
