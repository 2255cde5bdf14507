"""The demo corpus: the running interpreter's standard library, as jsonl.

Documents, in a fixed order so two runs on one interpreter write identical files:
1. every ``.py`` file under the stdlib directory (site-packages excluded), sorted by relative path,
   decoded per its PEP 263 coding line; files that do not decode are left out;
2. the docstrings of the modules compiled into the interpreter or shipped as its extension modules
   (``sys``, ``math``, …), which have no ``.py`` source, one document per module, sorted by name.

Each line is ``{"text": ..., "path": ...}``; ``path`` is relative to the stdlib directory, or
``<builtin>/name`` for the docstring documents, so it does not depend on where Python is installed.

    python -m megamod.data.corpus --output data/corpus.jsonl [--max-docs N]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterator

# Importing readline can write terminal control codes; the xx* modules are C API examples.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SKIP_EXTENSIONS = {"readline", "xxlimited", "xxlimited_35", "xxsubtype", "antigravity", "this"}


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _source_files(root: str) -> list[str]:
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in ("site-packages", "dist-packages", "__pycache__")]
        rel += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    # Sort the relative paths themselves, not os.walk's filesystem-dependent order.
    return sorted(p.replace(os.sep, "/") for p in rel)


def _read_source(path: str) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours "# -*- coding: ... -*-"
            return f.read()
    except (SyntaxError, UnicodeDecodeError, LookupError, OSError):
        return None  # the test suite ships deliberately mis-encoded files


def _extension_modules(root: str) -> list[str]:
    names = set(sys.builtin_module_names)
    dynload = os.path.join(root, "lib-dynload")
    if os.path.isdir(dynload):
        names |= {f.split(".", 1)[0] for f in os.listdir(dynload) if f.endswith((".so", ".pyd"))}
    # Private (_name) modules hold internals and test helpers; their public faces have .py files.
    return sorted(n for n in names if not n.startswith("_") and n not in _SKIP_EXTENSIONS)


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    # A default's repr can carry an address ("<object at 0x7f...>") that changes every run.
    return _ADDRESS.sub("", sig)


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else "" for line in inspect.cleandoc(text).splitlines())


def module_doc_text(name: str) -> str | None:
    """Docstrings of a module and its public callables, one level into classes. Only docstrings
    and signatures are written, never reprs, which could carry memory addresses."""
    try:
        mod = importlib.import_module(name)
    except (ImportError, OSError):
        return None
    parts = [f"Module {name}", ""]
    if mod.__doc__:
        parts += [inspect.cleandoc(mod.__doc__), ""]
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or not (callable(obj) and getattr(obj, "__doc__", None)):
            continue
        parts += [f"{attr}{_signature(obj)}", _indent(obj.__doc__), ""]
        if inspect.isclass(obj):
            for meth, m in sorted(vars(obj).items()):
                doc = getattr(m, "__doc__", None)
                if not meth.startswith("_") and callable(m) and isinstance(doc, str) and doc:
                    parts += [f"    {attr}.{meth}{_signature(m)}", _indent(_indent(doc)), ""]
    return "\n".join(parts).rstrip() + "\n" if len(parts) > 2 else None


def iter_stdlib_documents() -> Iterator[dict]:
    root = stdlib_dir()
    for rel in _source_files(root):
        text = _read_source(os.path.join(root, rel))
        if text is not None:
            yield {"text": text, "path": rel}
    for name in _extension_modules(root):
        text = module_doc_text(name)
        if text is not None:
            yield {"text": text, "path": f"<builtin>/{name}"}


def write_stdlib_corpus(out_path: str, max_docs: int | None = None) -> int:
    """Write the corpus as jsonl (to a temporary name, renamed when complete); returns the count."""
    if max_docs is not None and max_docs < 0:
        raise ValueError(f"max_docs must be >= 0, got {max_docs}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_stdlib_documents():
                if max_docs is not None and n >= max_docs:
                    break
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="jsonl file to write")
    ap.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    args = ap.parse_args(argv)
    if args.max_docs is not None and args.max_docs < 0:
        ap.error(f"--max-docs must be >= 0, got {args.max_docs}")
    n = write_stdlib_corpus(args.output, args.max_docs)
    print(f"wrote {n} documents to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
