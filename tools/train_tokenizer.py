"""Train a sentencepiece tokenizer (BPE or unigram) from jsonl or text files.

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix data/tok --vocab-size 4096

The corpus is streamed; a seeded reservoir of at most --input-sentence-size sentences is all that
is held in memory, so any corpus size trains in bounded memory and time. The model always
contains the end-of-document piece (--eod-token) that preprocess_data.py appends with
--append-eod, and by default a <pad> control piece.
"""

from __future__ import annotations

import argparse
import sys
import time

from megamod.data.sources import TEXT_UNITS, iter_documents, list_input_files
from megamod.data.spm_train import SpmOptions, reservoir_sample, split_sentences, train_sentencepiece
from megamod.data.tokenizer import EOD_PIECE, PAD_PIECE, Tokenizer


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True,
                    help="jsonl files (.jsonl/.json/.ndjson), text files, or directories of them")
    ap.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl fields to train on")
    ap.add_argument("--text-unit", choices=TEXT_UNITS, default="file",
                    help="plain text files: one document per file or per line")
    ap.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                    help="bpe trains much faster here; unigram encodes faster")
    ap.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                    help="unknown characters become UTF-8 byte pieces instead of <unk>")
    ap.add_argument("--eod-token", default=EOD_PIECE, help="end-of-document piece")
    ap.add_argument("--pad-token", default=PAD_PIECE, help="padding piece (see --no-pad)")
    ap.add_argument("--no-pad", action="store_true", help="no padding piece; pad with EOD")
    ap.add_argument("--special-tokens", nargs="*", default=[],
                    help="more user-defined pieces, never split (e.g. <|user|> <|assistant|>)")
    ap.add_argument("--character-coverage", type=float, default=0.9995,
                    help="fraction of characters given their own piece; the rest use byte fallback")
    ap.add_argument("--normalization", default="identity",
                    choices=["identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf"],
                    help="identity keeps text exact (code); nmt_nfkc is sentencepiece's default")
    ap.add_argument("--input-sentence-size", type=int, default=200_000,
                    help="train on a seeded sample of at most this many sentences")
    ap.add_argument("--max-sentence-bytes", type=int, default=2048,
                    help="documents are cut into runs of whole lines of at most this size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-threads", type=int, default=0, help="0: one per CPU")
    ap.add_argument("--verbose", action="store_true", help="sentencepiece's own training log")
    return ap


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.vocab_size < 8:
        ap.error(f"--vocab-size must be at least 8, got {a.vocab_size}")
    if a.byte_fallback and a.vocab_size < 256 + 8:
        ap.error(f"--vocab-size {a.vocab_size} leaves no room beside the 256 byte pieces of "
                 "--byte-fallback; use at least 264 or --no-byte-fallback")
    if not 0 < a.character_coverage <= 1:
        ap.error(f"--character-coverage must be in (0, 1], got {a.character_coverage}")
    if a.input_sentence_size < 1:
        ap.error(f"--input-sentence-size must be >= 1, got {a.input_sentence_size}")
    if a.max_sentence_bytes < 16:
        ap.error(f"--max-sentence-bytes must be >= 16, got {a.max_sentence_bytes}")
    if a.num_threads < 0:
        ap.error(f"--num-threads must be >= 0, got {a.num_threads}")
    if not a.eod_token:
        ap.error("--eod-token must not be empty")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    check_args(ap, a)
    try:
        files = list_input_files(a.input)
    except FileNotFoundError as e:
        ap.error(f"--input: {e}")
    if not files:
        ap.error(f"--input: no files found in {a.input}")

    t0 = time.perf_counter()
    bad: list[tuple[str, int, str]] = []
    n_docs = 0

    def sentences():
        nonlocal n_docs
        for fields in iter_documents(files, a.json_keys, a.text_unit, bad):
            n_docs += 1
            for text in fields:
                yield from split_sentences(text, a.max_sentence_bytes)

    sample, n_sent = reservoir_sample(sentences(), a.input_sentence_size, a.seed)
    t_read = time.perf_counter() - t0
    for path, line, why in bad[:20]:
        print(f"skipped {path}:{line}: {why}", file=sys.stderr)
    if len(bad) > 20:
        print(f"... and {len(bad) - 20} more skipped lines", file=sys.stderr)
    print(f"read {n_docs} documents, {n_sent} sentences ({len(bad)} bad lines skipped); training on "
          f"{len(sample)} in {t_read:.1f}s")

    if not sample:
        print(f"error: no training text in --input {' '.join(a.input)} (for jsonl, check "
              f"--json-keys {' '.join(a.json_keys)})", file=sys.stderr)
        return 2
    opts = SpmOptions(
        vocab_size=a.vocab_size, model_type=a.model_type, byte_fallback=a.byte_fallback,
        eod_piece=a.eod_token, pad_piece=None if a.no_pad else a.pad_token,
        special_tokens=a.special_tokens, character_coverage=a.character_coverage,
        normalization=a.normalization, input_sentence_size=a.input_sentence_size,
        max_sentence_bytes=a.max_sentence_bytes, seed=a.seed, num_threads=a.num_threads,
        verbose=a.verbose)
    t1 = time.perf_counter()
    try:
        model = train_sentencepiece(sample, a.model_prefix, opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = Tokenizer(model)
    probe = "".join(sample[:200])
    ratio = len(tok.encode(probe)) / max(1, len(probe.encode("utf-8")))
    print(f"wrote {model} in {time.perf_counter() - t1:.1f}s: vocab {tok.vocab_size}, eod id "
          f"{tok.eod_id}, pad id {tok.pad_id}, {ratio:.3f} tokens/byte on a sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
