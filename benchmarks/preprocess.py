"""Preprocessing throughput against sentencepiece's raw encoding speed on the same text.

    python benchmarks/preprocess.py --workers 1 2 --repeats 3 --results benchmarks/results/preprocess.md

"raw" is the tokenizer alone: the documents already decoded in memory, encoded one by one in
one thread, nothing else, the ceiling for one process. "preprocess" is the whole tool: reading
the jsonl, parsing JSON, encoding, packing, writing .bin/.idx, starting the worker pool. Runs are
interleaved (raw, 1 worker, 2 workers, raw, ...) so drift in machine load hits all alike; the
median of the repeats is reported, and the best beside it.

Default input: the stdlib demo corpus and a 4096-token BPE model trained on it, as ``make demo``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import sentencepiece

from megamod.data.corpus import write_stdlib_corpus
from megamod.data.preprocess import preprocess
from megamod.data.spm_train import SpmOptions, reservoir_sample, split_sentences, train_sentencepiece
from megamod.data.tokenizer import Tokenizer


RESULTS_HEADER = """# Preprocessing throughput

Produced by `benchmarks/preprocess.py`; newest last. "raw" is sentencepiece alone: the documents
already in memory, encoded one by one in one thread. "preprocess_data.py" is the whole tool, timed
inside `preprocess()`: planning, reading the jsonl, JSON parsing, encoding, packing, writing
.bin/.idx, starting and stopping the worker pool. The goal: 2 workers at least 1.6× raw.

"""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def raw_encode(tok: Tokenizer, texts: list[str], threads: int | None = None) -> tuple[float, int]:
    """Seconds and tokens to encode every text; per document in Python, or sentencepiece's batch
    call with ``threads`` C++ threads."""
    t0 = time.perf_counter()
    if threads is None:
        n = sum(len(tok.encode(t)) for t in texts)
    else:
        n = sum(len(x) for x in tok.encode_batch(texts, num_threads=threads))
    return time.perf_counter() - t0, n


def prepare(work: str, corpus: str | None, model: str | None) -> tuple[str, str]:
    if corpus is None:
        corpus = os.path.join(work, "corpus.jsonl")
        write_stdlib_corpus(corpus)
    if model is None:
        texts = (json.loads(line)["text"] for line in open(corpus, encoding="utf-8"))
        sample, _ = reservoir_sample((s for t in texts for s in split_sentences(t, 2048)), 200_000, 0)
        model = train_sentencepiece(sample, os.path.join(work, "tok"), SpmOptions(vocab_size=4096))
    return corpus, model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", help="jsonl with a 'text' key (default: the stdlib demo corpus)")
    ap.add_argument("--tokenizer-model", help="sentencepiece model (default: trained on the corpus)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", help="append a dated markdown section to this file")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {a.repeats}")
    if any(w < 1 for w in a.workers):
        ap.error(f"--workers must all be >= 1, got {a.workers}")

    load_before = os.getloadavg()[0]  # other jobs' load, before ours adds to it
    with tempfile.TemporaryDirectory() as work:
        corpus, model = prepare(work, a.corpus, a.tokenizer_model)
        tok = Tokenizer(model)
        texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
        mb = os.path.getsize(corpus) / 1e6
        rates: dict[str, list[float]] = {"raw": [], **{f"w{w}": [] for w in a.workers}}
        tokens = 0
        for r in range(a.repeats):
            dt, tokens = raw_encode(tok, texts)
            rates["raw"].append(tokens / dt)
            for w in a.workers:
                s = preprocess([corpus], os.path.join(work, f"out{w}"), model, append_eod=False,
                               workers=w, progress=False)
                assert s.tokens == tokens, (s.tokens, tokens)  # same text, same tokens
                rates[f"w{w}"].append(s.tokens / s.seconds)
            print(f"repeat {r + 1}/{a.repeats}: " + ", ".join(
                f"{k} {v[-1] / 1e6:.2f}" for k, v in rates.items()) + " M tokens/s", file=sys.stderr)
        batch1 = tokens / raw_encode(tok, texts, threads=1)[0]
        batch_all = tokens / raw_encode(tok, texts, threads=os.cpu_count() or 1)[0]

    raw = statistics.median(rates["raw"])
    rows = [("sentencepiece raw, per document, 1 thread", raw, max(rates["raw"]))]
    rows += [(f"preprocess_data.py --workers {w}", statistics.median(rates[f"w{w}"]),
              max(rates[f"w{w}"])) for w in a.workers]
    table = ["| what | M tokens/s (median) | best | × raw |", "|---|---:|---:|---:|"]
    table += [f"| {name} | {m / 1e6:.2f} | {b / 1e6:.2f} | {m / raw:.2f} |" for name, m, b in rows]
    for name, rate in (("(reference, 1 run) sentencepiece batch call, 1 thread", batch1),
                       (f"(reference, 1 run) sentencepiece batch call, {os.cpu_count()} threads",
                        batch_all)):
        table.append(f"| {name} | {rate / 1e6:.2f} | | {rate / raw:.2f} |")
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    cmd = env + " ".join(shlex.quote(x) for x in [exe, *sys.argv])
    section = "\n".join([
        f"## {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "",
        f"- command: `{cmd}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"sentencepiece {sentencepiece.__version__}",
        f"- input: {'stdlib demo corpus' if a.corpus is None else a.corpus}, {len(texts)} documents, "
        f"{mb:.1f} MB, {tokens:,} tokens; tokenizer: "
        f"{'4096-token BPE trained on it' if a.tokenizer_model is None else a.tokenizer_model}",
        f"- {a.repeats} interleaved repeats; 1-minute load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (other jobs on the machine lower every number)",
        "",
        *table,
        "",
    ])
    print(section)
    if a.results:
        os.makedirs(os.path.dirname(os.path.abspath(a.results)), exist_ok=True)
        new = not os.path.exists(a.results)
        with open(a.results, "a", encoding="utf-8") as f:
            if new:
                f.write(RESULTS_HEADER)
            f.write(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
