"""Tokenize jsonl or plain text into Megatron .bin/.idx datasets, one per json key.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/stdlib \\
        --json-keys text --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model data/tok.model --append-eod --workers 2

writes data/stdlib_text_document.{bin,idx}. Flags follow Megatron-LM's tool. --input may also be
plain text files (one document per file, or per line with --text-unit line) or directories.
Bad lines (invalid JSON, missing key, not UTF-8) are skipped and listed with their line numbers
(all of them in PREFIX_skipped.tsv); --strict stops at the first one instead. Outputs appear under
their final names only once complete.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from megamod.data.preprocess import BadInputError, preprocess
from megamod.data.sources import TEXT_UNITS

# Megatron's GPTSentencePieceTokenizer differs from SentencePieceTokenizer only in which
# special ids it exposes; both encode text identically here.
TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="jsonl/text files or directories")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="jsonl fields to tokenize, each into its own dataset")
    g.add_argument("--text-unit", choices=TEXT_UNITS, default="file",
                   help="plain text inputs: one document per file or per line")
    g.add_argument("--strict", action="store_true", help="stop at the first bad line")
    g = ap.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    g.add_argument("--append-eod", action="store_true", help="end every document with the EOD id")
    g = ap.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="writes PREFIX_{key}_document.bin and .idx")
    g = ap.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--chunk-mb", type=float, default=1.0, help="input handed to a worker at a time")
    g.add_argument("--log-interval", type=int, default=1000, help="print progress every N documents")
    return ap


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.workers < 1:
        ap.error(f"--workers must be >= 1, got {a.workers}")
    if a.log_interval < 1:
        ap.error(f"--log-interval must be >= 1, got {a.log_interval}")
    if a.chunk_mb <= 0:
        ap.error(f"--chunk-mb must be positive, got {a.chunk_mb}")
    if not os.path.isfile(a.tokenizer_model):
        ap.error(f"--tokenizer-model: no such file {a.tokenizer_model}")
    for p in a.input:
        if not os.path.exists(p):
            ap.error(f"--input: no such file or directory {p}")
    if len(set(a.json_keys)) != len(a.json_keys):
        ap.error(f"--json-keys: repeated key in {a.json_keys}")
    if a.output_prefix.endswith(os.sep) or os.path.isdir(a.output_prefix):
        ap.error(f"--output-prefix must name files, not a directory: {a.output_prefix}")


def write_skipped(path: str, bad: list[tuple[str, int, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("path\tline\treason\n")
        f.writelines(f"{p}\t{n}\t{why}\n" for p, n, why in bad)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    check_args(ap, a)
    # SIGTERM (a scheduler's kill) unwinds like Ctrl-C, so temporary outputs are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        stats = preprocess(a.input, a.output_prefix, a.tokenizer_model, a.json_keys,
                           append_eod=a.append_eod, workers=a.workers, strict=a.strict,
                           text_unit=a.text_unit, chunk_bytes=int(a.chunk_mb * (1 << 20)),
                           log_interval=a.log_interval)
    except BadInputError as e:
        print(f"error: {e} (--strict; nothing was written)", file=sys.stderr)
        return 1
    except ValueError as e:  # e.g. several --json-keys for plain text, a token id out of range
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, line, why in stats.bad[:20]:
        print(f"skipped {path}:{line}: {why}", file=sys.stderr)
    if stats.bad:
        listing = f"{a.output_prefix}_skipped.tsv"
        write_skipped(listing, stats.bad)
        print(f"skipped {len(stats.bad)} bad lines in all, listed in {listing}", file=sys.stderr)
    if stats.docs == 0:
        print(f"warning: no documents found; for jsonl, check --json-keys {' '.join(a.json_keys)}",
              file=sys.stderr)
    rate = stats.tokens / max(stats.seconds, 1e-9)
    print(f"wrote {stats.docs:,} documents, {stats.tokens:,} tokens in {stats.seconds:.1f}s "
          f"({rate / 1e6:.2f} M tokens/s) to {', '.join(p + '.{bin,idx}' for p in stats.outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
