"""Concatenate several .bin/.idx datasets into one, documents in the order given.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document

A directory given to --input contributes every complete prefix in it, in sorted order (Megatron's
tool takes a directory). All inputs must hold tokens of the same dtype. The output appears under
its final name only once complete.
"""

from __future__ import annotations

import argparse
import os
import sys

from megamod.data.indexed import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, strip_suffix


def expand_inputs(paths: list[str]) -> list[str]:
    """Prefixes to merge; raises FileNotFoundError for a path that names no dataset."""
    prefixes = []
    for p in paths:
        if os.path.isdir(p):
            names = sorted(f[:-4] for f in os.listdir(p) if f.endswith(".idx"))
            prefixes += [os.path.join(p, n) for n in names if os.path.exists(os.path.join(p, n + ".bin"))]
        elif os.path.exists(strip_suffix(p) + ".idx") or os.path.exists(strip_suffix(p) + ".bin"):
            prefixes.append(strip_suffix(p))
        else:
            raise FileNotFoundError(f"{p}: neither a directory nor a dataset prefix (no .idx/.bin)")
    return prefixes


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    datasets = [IndexedDataset(p) for p in prefixes]  # validates all inputs before writing
    dtypes = {str(d.dtype) for d in datasets}
    if len(dtypes) > 1:
        detail = ", ".join(f"{d.prefix}: {d.dtype}" for d in datasets)
        raise IndexedDatasetError(f"inputs hold different token dtypes ({detail}); re-tokenize "
                                  "them with one tokenizer")
    dtype = datasets[0].dtype
    for d in datasets:
        d.close()
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    with IndexedDatasetBuilder(output_prefix, dtype) as b:
        for p in prefixes:
            b.add_index(p)
        b.finalize()
    return IndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="dataset prefixes or directories")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    a = ap.parse_args(argv)
    try:
        prefixes = expand_inputs(a.input)
    except FileNotFoundError as e:
        ap.error(f"--input: {e}")
    if not prefixes:
        ap.error(f"--input: no datasets (.bin/.idx pairs) found in {a.input}")
    out = strip_suffix(a.output_prefix)
    if out in prefixes:
        ap.error(f"--output-prefix {out} is also an input")
    try:
        merged = merge(prefixes, out)
    except IndexedDatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets into {out}: {merged.num_documents:,} documents, "
          f"{len(merged):,} sequences, {merged.num_tokens:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
