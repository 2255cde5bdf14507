"""Training a sentencepiece model on a bounded, seeded sample of a corpus of any size.

sentencepiece trains on "sentences". We cut each document into runs of whole lines of at most
``max_sentence_bytes``, keeping the newlines, so pieces can learn ``":\\n"`` or ``"\\n\\n"`` (code and
prose are full of them) instead of spending a byte-fallback token on every line break. A reservoir
sample of ``input_sentence_size`` such sentences is all that is ever held in memory.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import sentencepiece as spm

from megamod.data.tokenizer import EOD_PIECE, PAD_PIECE


@dataclass
class SpmOptions:
    vocab_size: int = 4096
    model_type: str = "bpe"  # or "unigram"
    byte_fallback: bool = True
    eod_piece: str = EOD_PIECE
    pad_piece: str | None = PAD_PIECE  # None: no pad id (the Tokenizer then pads with EOD)
    special_tokens: Sequence[str] = field(default_factory=list)  # extra user-defined pieces
    character_coverage: float = 0.9995
    normalization: str = "identity"
    input_sentence_size: int = 200_000
    max_sentence_bytes: int = 2048
    seed: int = 0
    num_threads: int = 0  # 0: one per CPU
    verbose: bool = False


def split_sentences(text: str, max_bytes: int) -> Iterator[str]:
    """Greedy runs of whole lines (newlines kept) of at most ``max_bytes`` UTF-8 bytes; a single
    longer line is cut at character boundaries. Whitespace-only runs are dropped."""
    run: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if run and size + n > max_bytes:
            yield from _nonblank("".join(run))
            run, size = [], 0
        if n > max_bytes:
            b = line.encode("utf-8")
            for i in range(0, n, max_bytes):
                # errors="ignore" drops a character cut in half at a slice edge: harmless in a sample.
                yield from _nonblank(b[i:i + max_bytes].decode("utf-8", errors="ignore"))
            continue
        run.append(line)
        size += n
    if run:
        yield from _nonblank("".join(run))


def _nonblank(s: str) -> Iterator[str]:
    if s.strip():
        yield s


def reservoir_sample(items: Iterable[str], k: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of k items from a stream of unknown length (Algorithm R), and how many
    items the stream had. Deterministic for a seed."""
    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    for n, item in enumerate(items, start=1):
        if len(sample) < k:
            sample.append(item)
        else:
            j = rng.randrange(n)
            if j < k:
                sample[j] = item
    return sample, n


def train_sentencepiece(sentences: Sequence[str], model_prefix: str, opts: SpmOptions) -> str:
    """Train on the given sentences; writes ``{model_prefix}.model`` and ``.vocab`` (via temporary
    names, so an interrupted run leaves no half-written model) and returns the .model path."""
    if not sentences:
        raise ValueError("no training text: every input was empty or skipped")
    user_symbols = [opts.eod_piece, *[t for t in opts.special_tokens if t != opts.eod_piece]]
    tmp_prefix = f"{model_prefix}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.set_random_generator_seed(opts.seed)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sentences),
            model_prefix=tmp_prefix,
            model_type=opts.model_type,
            vocab_size=opts.vocab_size,
            byte_fallback=opts.byte_fallback,
            character_coverage=opts.character_coverage,
            user_defined_symbols=user_symbols,
            unk_id=0, bos_id=1, eos_id=2,
            pad_id=3 if opts.pad_piece else -1,
            pad_piece=opts.pad_piece or "<pad>",
            # Exact text in, exact text out: NFKC and whitespace folding would rewrite code
            # (indentation is syntax) and break decode(encode(x)) == x.
            normalization_rule_name=opts.normalization,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,  # indentation runs become single pieces
            split_digits=True,
            input_sentence_size=0,  # we already sampled; 0 = use every sentence given
            max_sentence_length=opts.max_sentence_bytes + 16,
            num_threads=opts.num_threads or os.cpu_count() or 1,
            minloglevel=0 if opts.verbose else 2,
        )
    except RuntimeError as e:
        _remove(tmp_prefix)
        msg = str(e)
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise ValueError(f"--vocab-size {opts.vocab_size} does not fit this corpus: {msg}") from e
        raise
    except BaseException:
        _remove(tmp_prefix)
        raise
    for ext in (".vocab", ".model"):  # .model last: its presence means the pair is complete
        os.replace(tmp_prefix + ext, model_prefix + ext)
    return model_prefix + ".model"


def _remove(prefix: str) -> None:
    for ext in (".model", ".vocab"):
        if os.path.exists(prefix + ext):
            os.remove(prefix + ext)
