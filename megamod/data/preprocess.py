"""Tokenize raw documents into ``{prefix}_{key}_document.{bin,idx}`` with several processes.

The parent only plans byte ranges (whole lines, ~``chunk_bytes`` each) and writes results; each
worker reads its range itself, parses, tokenizes and returns the tokens already packed in the
output dtype. So the parent moves about 2 bytes per token and the workers do everything else,
which is what lets N workers on N cores approach N times one process's tokenizer speed.
``Pool.imap`` returns results in submission order, so the output order is the input order for
any number of workers.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import TextIO

import numpy as np

from megamod.data.indexed import IndexedDatasetBuilder, dtype_for_vocab
from megamod.data.sources import Chunk, list_input_files, plan_chunks, read_chunk
from megamod.data.tokenizer import Tokenizer


class BadInputError(ValueError):
    """A bad input line under ``strict``; the message is ``path:line: reason``."""


@dataclass(frozen=True)
class EncodeTask:
    chunk: Chunk
    keys: tuple[str, ...]
    text_unit: str
    model_path: str
    append_eod: bool
    dtype: str


@dataclass
class EncodedChunk:
    tokens: list[np.ndarray]  # per key: all documents' tokens concatenated, in the output dtype
    lengths: list[np.ndarray]  # per key: int64 tokens per document
    num_docs: int
    num_lines: int
    num_bytes: int
    bad: list[tuple[int, str]]  # (line within the chunk, reason)


@dataclass
class PreprocessStats:
    outputs: list[str]
    docs: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    bad: list[tuple[str, int, str]] = field(default_factory=list)  # (path, line, reason)


@functools.cache
def _tokenizer(model_path: str) -> Tokenizer:
    # One load per worker process, not per chunk: the cache lives exactly as long as the worker.
    return Tokenizer(model_path)


def encode_chunk(task: EncodeTask) -> EncodedChunk:
    tok = _tokenizer(task.model_path)
    r = read_chunk(task.chunk, task.keys, task.text_unit)
    dtype = np.dtype(task.dtype)
    tokens, lengths = [], []
    for texts in r.docs:
        ids = [tok.encode(t) for t in texts]
        if task.append_eod:
            for x in ids:
                if x:  # an empty document stays empty (no lone EOD), as in Megatron's preprocess_data
                    x.append(tok.eod_id)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens.append(np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lens.sum())))
        lengths.append(lens)
    return EncodedChunk(tokens, lengths, len(r.docs[0]), r.num_lines,
                        task.chunk.end - task.chunk.start, r.bad)


class Progress:
    """One status line: every ``log_interval`` documents, and redrawn in place on a terminal."""

    def __init__(self, total_bytes: int, log_interval: int, stream: TextIO) -> None:
        self.total_bytes, self.log_interval, self.stream = total_bytes, log_interval, stream
        self.tty = stream.isatty()
        self.t0 = self.t_drawn = time.perf_counter()
        self.next_log = log_interval

    def line(self, docs: int, tokens: int, nbytes: int) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        pct = 100.0 * nbytes / self.total_bytes if self.total_bytes else 100.0
        return (f"{pct:5.1f}% | {docs:,} docs, {tokens:,} tokens | {docs / dt:,.0f} docs/s, "
                f"{tokens / dt / 1e6:.2f} M tokens/s, {nbytes / dt / 1e6:.1f} MB/s")

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        now = time.perf_counter()
        if self.tty and now - self.t_drawn > 0.2:
            self.stream.write("\r" + self.line(docs, tokens, nbytes))
            self.stream.flush()
            self.t_drawn = now
        elif not self.tty and docs >= self.next_log:
            self.stream.write(self.line(docs, tokens, nbytes) + "\n")
            self.next_log = (docs // self.log_interval + 1) * self.log_interval

    def close(self, docs: int, tokens: int, nbytes: int) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line(docs, tokens, nbytes) + "\n")


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"  # Megatron's naming, which training configs expect


def preprocess(inputs: Sequence[str], prefix: str, model_path: str, keys: Sequence[str] = ("text",),
               append_eod: bool = False, workers: int = 1, strict: bool = False,
               text_unit: str = "file", chunk_bytes: int = 1 << 20, log_interval: int = 1000,
               progress: bool | TextIO = True) -> PreprocessStats:
    """Tokenize every document of ``inputs``; see the module docstring. Plain text inputs have one
    field, written under the first key. Raises BadInputError on the first bad line if ``strict``;
    otherwise bad lines are skipped and listed in the returned stats. ``progress``: True for a
    status line on stderr, False for none, or a stream."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    files = list_input_files(inputs)
    if any(f.kind == "text" for f in files) and len(keys) != 1:
        raise ValueError(f"plain text inputs have one field; got {len(keys)} keys {list(keys)}")
    tok = Tokenizer(model_path)  # fail on a bad model here, not in every worker
    dtype = dtype_for_vocab(tok.vocab_size)
    # At least ~8 chunks per worker, so the last chunk's tail leaves the others idle only briefly.
    total = sum(os.path.getsize(f.path) for f in files)
    chunks = plan_chunks(files, max(64 << 10, min(chunk_bytes, total // (8 * workers))), text_unit)
    tasks = [EncodeTask(c, tuple(keys), text_unit, model_path, append_eod, dtype.str) for c in chunks]
    stats = PreprocessStats(outputs=[output_prefix(prefix, k) for k in keys])
    stream = sys.stderr if progress is True else progress or None  # stderr looked up per call
    bar = Progress(sum(c.end - c.start for c in chunks), log_interval, stream) if stream else None
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)

    with contextlib.ExitStack() as stack:
        builders = [stack.enter_context(IndexedDatasetBuilder(p, dtype)) for p in stats.outputs]
        if workers > 1:
            # fork: workers start in milliseconds and inherit the loaded modules; the parent has
            # started no threads of its own at this point.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(multiprocessing.get_context(method).Pool(workers))
            results = pool.imap(encode_chunk, tasks, chunksize=1)
        else:
            results = map(encode_chunk, tasks)
        line0 = 0
        for task, r in zip(tasks, results):
            c = task.chunk
            line0 = 0 if c.start == 0 else line0  # line numbers restart with each file
            for n, why in r.bad:
                if strict:
                    raise BadInputError(f"{c.file.path}:{line0 + n}: {why}")
                stats.bad.append((c.file.path, line0 + n, why))
            line0 += r.num_lines
            for b, toks, lens in zip(builders, r.tokens, r.lengths):
                b.add_documents(toks, lens, empty_sequence=False)  # an empty document writes no sequence
            stats.docs += r.num_docs
            stats.tokens += sum(int(t.size) for t in r.tokens)
            stats.bytes += r.num_bytes
            if bar:
                bar.update(stats.docs, stats.tokens, stats.bytes)
        for b in builders:
            b.finalize()
    if bar:
        bar.close(stats.docs, stats.tokens, stats.bytes)
    stats.seconds = time.perf_counter() - t0
    return stats
