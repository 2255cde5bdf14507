"""A corpus of ~100M+ tokens any machine with Python packages installed can build: the source,
headers and docs of the installed site-packages, after the standard library (``corpus.py``).

Documents, in a fixed order so two builds on one machine write identical files:
1. the demo corpus: the running interpreter's standard library and its builtin modules' docs;
2. for each site directory (the running interpreter's ``site.getsitepackages()`` and user site,
   then any ``--root`` given, in that order, each once by real path), every file whose suffix is
   in ``SUFFIXES`` — Python and Cython, C/C++/CUDA sources and headers, and docs (``.md``,
   ``.rst``, ``.txt``, and the ``METADATA`` of each ``.dist-info``, which holds the package's
   README) — sorted by relative path; ``__pycache__`` and hidden folders are
   skipped, and so are license and packaging files (``LICENSE*``, ``RECORD``, ...), files over
   ``MAX_FILE_BYTES`` (generated tables), files with a line over ``MAX_LINE_CHARS`` (minified or
   embedded data), files that are not UTF-8, and exact duplicates of an earlier document
   (vendored copies, empty ``__init__.py``).

Each line is ``{"text": ..., "path": ...}``; a site file's ``path`` is ``site-packages/{relative
path}``, so it does not depend on where the packages are installed. Which packages a machine has
decides the size: the project's CPU venv gives ~190 MB of text, the GPU image more (README,
"Data"). Build the tokenizer and the .bin/.idx with ``benchmarks/isoflop_data.sh``.

    python -m megamod.data.site_corpus --output data/site.jsonl [--root DIR ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import site
import sys
from collections.abc import Iterable, Iterator

from megamod.data.corpus import iter_stdlib_documents

SUFFIXES = (".py", ".pyi", ".pyx", ".pxd", ".h", ".hpp", ".inl", ".cuh", ".c", ".cc", ".cpp", ".cu", ".md", ".rst",
            ".txt")
SKIP_PREFIXES = ("license", "licence", "copying", "notice", "authors", "record", "top_level", "entry_points",
                 "requires", "requirements", "dependency_links", "sources", "installed-files")
MAX_FILE_BYTES = 1 << 20
MAX_LINE_CHARS = 4000


def site_dirs(extra: Iterable[str] = ()) -> list[str]:
    """The site directories to read, each once by real path, in a fixed order."""
    dirs = [*site.getsitepackages(), site.getusersitepackages(), *extra]
    out, seen = [], set()
    for d in dirs:
        real = os.path.realpath(d)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            out.append(real)
    return out


def _wanted(name: str) -> bool:
    lower = name.lower()
    return name == "METADATA" or lower.endswith(SUFFIXES) and not lower.startswith(SKIP_PREFIXES)


def _site_files(root: str) -> list[str]:
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        rel += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if _wanted(f)]
    return sorted(p.replace(os.sep, "/") for p in rel)  # not os.walk's filesystem order


def _read_text(path: str) -> str | None:
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.strip() or max(map(len, text.splitlines()), default=0) > MAX_LINE_CHARS:
        return None
    return text


def iter_site_documents(roots: Iterable[str], seen: set[bytes] | None = None) -> Iterator[dict]:
    """The documents of the given site directories, in order; ``seen``: hashes of earlier documents."""
    seen = set() if seen is None else seen
    for root in roots:
        for rel in _site_files(root):
            text = _read_text(os.path.join(root, rel))
            if text is not None and _fresh(text, seen):
                yield {"text": text, "path": f"site-packages/{rel}"}


def _fresh(text: str, seen: set[bytes]) -> bool:
    h = hashlib.sha1(text.encode("utf-8")).digest()
    if h in seen:
        return False
    seen.add(h)
    return True


def iter_corpus_documents(extra_roots: Iterable[str] = ()) -> Iterator[dict]:
    """The standard library's documents, then the site directories' (module docstring)."""
    seen: set[bytes] = set()
    yield from (d for d in iter_stdlib_documents() if _fresh(d["text"], seen))
    yield from iter_site_documents(site_dirs(extra_roots), seen)


def write_site_corpus(out_path: str, extra_roots: Iterable[str] = ()) -> tuple[int, int]:
    """Write the corpus as jsonl (to a temporary name, renamed when complete); returns
    (documents, UTF-8 bytes of text)."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    docs = size = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_corpus_documents(extra_roots):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                docs += 1
                size += len(doc["text"].encode("utf-8"))
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return docs, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="jsonl file to write")
    ap.add_argument("--root", action="append", default=[], help="another directory of packages to read")
    args = ap.parse_args(argv)
    missing = [r for r in args.root if not os.path.isdir(r)]
    if missing:
        ap.error(f"--root {missing[0]}: no such directory")
    docs, size = write_site_corpus(args.output, args.root)
    print(f"wrote {docs} documents, {size / 1e6:.1f} MB of text, to {args.output} "
          f"(site directories: {', '.join(site_dirs(args.root))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
