"""Long sequences on one GPU: the 1b flavour trained through the real CLI with MoBA (4096/12, the last
3 layers dense) and with dense cuDNN attention, side by side at each length (issue #21).

    python benchmarks/long_context.py --runs moba:262144,dense:262144,moba:524288 --json out.json
    python benchmarks/long_context.py --tiny        # CPU smoke test: the debug flavour, short sequences

Every run: one process, `python -m megamod.train --config examples/configs/1b.yaml` on synthetic
tokens, micro-batch 1, activation checkpointing, the chunked loss (8192 tokens a chunk), ZeRO-0
(bf16 weights, MasterAdamW), --train.steps N (the first step compiles the kernels and is not
counted: the numbers are the last logged step's). Reported: step time, tokens/s, TFLOP/s and MFU
as the trainer logs them (analytic model FLOPs, model/flops.py: MoBA layers topk blocks of keys
per query, dense layers the full square, recomputation not counted), peak GPU memory; or the error (out of memory).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run(kind: str, seq: int, steps: int, tiny: bool, timeout: int) -> dict:
    flags = ["--config", "examples/configs/debug.yaml" if tiny else "examples/configs/1b.yaml",
             "--data.synthetic", "true", "--train.seq_len", str(seq), "--model.max_seq_len", str(seq),
             "--train.micro_batch_size", "1", "--train.grad_accum", "1", "--train.activation_checkpointing", "true",
             "--train.loss_chunk_tokens", "8192", "--optim.zero_stage", "0", "--train.steps", str(steps),
             "--train.log_interval", "1", "--train.eval_interval", "0", "--train.eval_steps", "1",
             "--checkpoint.save_at_end", "false", "--checkpoint.resume", "false", "--logging.tensorboard", "false",
             "--train.progress", "off"]
    if kind == "moba":
        chunk = 16 if tiny else 4096
        flags += ["--model.attention", "moba", "--moba.chunk_size", str(chunk), "--moba.topk", "12",
                  "--moba.full_attention_layers", "-1", "-2", "-3"]
    row = dict(kind=kind, seq=seq, steps=steps)
    with tempfile.TemporaryDirectory() as run_dir:
        try:
            p = subprocess.run([sys.executable, "-m", "megamod.train", *flags, "--train.run_dir", run_dir], cwd=REPO,
                               capture_output=True, text=True, timeout=timeout,
                               env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
        except subprocess.TimeoutExpired:
            return dict(row, error=f"ran past {timeout} s")
        if p.returncode != 0:
            tail = (p.stderr or p.stdout)[-600:]
            return dict(row, error="out of memory" if "out of memory" in tail.lower() else tail)
        recs = [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["kind"] == "train"]
    last = recs[-1]
    for key in ("step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem_gib", "peak_rss_gib"):
        if key in last:
            row[key] = last[key]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="moba:262144,dense:262144", help="kind:seq_len, comma-separated, in order")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    runs = "moba:512,dense:512" if args.tiny else args.runs
    out = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               command=" ".join(sys.argv), rows=[])
    for spec in runs.split(","):
        kind, seq = spec.split(":")
        row = run(kind, int(seq), args.steps, args.tiny, args.timeout)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
