"""The installed-packages corpus (megamod/data/site_corpus.py) over a made-up site directory."""

import json

from megamod.data import site_corpus
from megamod.data.site_corpus import iter_site_documents, site_dirs


def test_site_documents_are_ordered_filtered_and_deduplicated(tmp_path):
    root = tmp_path / "site-packages"
    files = {
        "pkg/__init__.py": "",                                  # empty: skipped
        "pkg/b.py": "def b():\n    return 2\n",
        "pkg/a.py": "def a():\n    return 1\n",
        "pkg/copy_of_a.py": "def a():\n    return 1\n",            # duplicate of a.py: skipped
        "pkg/kernels.cuh": "__device__ int f();\n",
        "pkg/README.md": "# pkg\nA package.\n",
        "pkg/LICENSE.txt": "MIT License ...\n",                   # licence: skipped
        "pkg/data.json": '{"not": "text we train on"}\n',         # suffix not listed: skipped
        "pkg/minified.py": "x = [" + "1, " * 3000 + "]\n",        # a line over MAX_LINE_CHARS: skipped
        "pkg/__pycache__/a.cpython-311.py": "cached\n",           # __pycache__: skipped
        "pkg-1.0.dist-info/METADATA": "Name: pkg\n\nThe package's README.\n",
        "pkg-1.0.dist-info/RECORD": "pkg/a.py,sha256=...\n",     # packaging file: skipped
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "pkg" / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))  # not UTF-8: skipped
    docs = list(iter_site_documents([str(root)]))
    assert [d["path"] for d in docs] == [
        "site-packages/pkg-1.0.dist-info/METADATA", "site-packages/pkg/README.md", "site-packages/pkg/a.py",
        "site-packages/pkg/b.py", "site-packages/pkg/kernels.cuh"]
    assert docs[2]["text"] == files["pkg/a.py"]
    seen: set[bytes] = set()
    assert len(list(iter_site_documents([str(root)], seen))) == 5
    assert list(iter_site_documents([str(root)], seen)) == []  # everything already seen
    assert site_dirs([str(root), str(root)]).count(str(root.resolve())) == 1


def test_write_corpus_is_deterministic(tmp_path, monkeypatch):
    root = tmp_path / "site"
    (root / "m").mkdir(parents=True)
    for i in range(3):
        (root / "m" / f"f{i}.py").write_text(f"x = {i}\n")
    monkeypatch.setattr(site_corpus, "iter_stdlib_documents", lambda: iter([{"text": "x = 0\n", "path": "s.py"}]))
    monkeypatch.setattr(site_corpus, "site_dirs", lambda extra: list(extra))
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        n, size = site_corpus.write_site_corpus(str(tmp_path / name), [str(root)])
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and n == 3 and size == 18  # f0.py repeats the stdlib document: skipped
    assert [json.loads(line)["path"] for line in outs[0].decode().splitlines()] == [
        "s.py", "site-packages/m/f1.py", "site-packages/m/f2.py"]
