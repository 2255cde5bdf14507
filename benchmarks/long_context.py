"""Long sequences on one GPU: the 1b flavour trained through the real CLI with MoBA (4096/12, the last
3 layers dense) and with dense cuDNN attention, side by side at each length (issue #21).

    python benchmarks/long_context.py --runs moba:262144,dense:262144,moba:524288 --json out.json
    python benchmarks/long_context.py --tiny        # CPU smoke test: the debug flavour, short sequences

Every run: its own process (an out-of-memory ends only that run), the real Trainer built from
examples/configs/1b.yaml on synthetic tokens, micro-batch 1, activation checkpointing, the chunked
loss (8192 tokens a chunk), ZeRO-0 (bf16 weights, MasterAdamW); one warm-up step (kernel
compilation), then --steps timed optimizer steps (device synchronised around each; no evaluation
or checkpoint). Reported: the median step time, tokens/s, TFLOP/s and MFU against the bf16 peak
from the trainer's analytic model FLOPs (model/flops.py: MoBA layers topk blocks of keys per
query, dense layers the full square; recomputation not counted), peak GPU memory; or the error.
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


def child(kind: str, seq: int, steps: int, tiny: bool, warmup: int = 1) -> dict:
    import statistics
    import time

    import torch
    import torch.distributed as dist

    sys.path.insert(0, REPO)
    from megamod.config import load_config
    from megamod.model.flops import peak_flops
    from megamod.parallel.dims import ParallelDims
    from megamod.train.data import micro_batches
    from megamod.train.trainer import Trainer

    flags = ["--data.synthetic", "true", "--train.seq_len", str(seq), "--model.max_seq_len", str(seq),
             "--train.micro_batch_size", "1", "--train.grad_accum", "1", "--train.activation_checkpointing", "true",
             "--train.loss_chunk_tokens", "8192", "--optim.zero_stage", "0", "--train.steps", str(steps + warmup),
             "--checkpoint.resume", "false", "--logging.tensorboard", "false", "--train.progress", "off",
             "--train.run_dir", tempfile.mkdtemp()]
    if kind == "moba":
        flags += ["--model.attention", "moba", "--moba.chunk_size", "16" if tiny else "4096", "--moba.topk", "12",
                  "--moba.full_attention_layers", "-1", "-2", "-3"]
    cfg = load_config(os.path.join(REPO, "examples/configs", "debug.yaml" if tiny else "1b.yaml"), flags)
    device = torch.device("cpu" if tiny else "cuda")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29593")
    dist.init_process_group("gloo" if tiny else "nccl", rank=0, world_size=1)
    dims = ParallelDims(tp=1, cp=1, dp=1, pp=1, rank=0)
    dims.build_groups()
    trainer = Trainer.build(cfg, dims, device)
    batches = micro_batches(trainer.train_data, 1, 0, 1, 0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps + warmup):
        sync()
        t0 = time.perf_counter()
        trainer.train_step(batches)
        sync()
        if i >= warmup:  # a warm-up step compiles the kernels
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tflops = trainer.step_flops / step / 1e12
    peak = peak_flops(torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "bf16")
    row = dict(step_time_s=step, tokens_per_s=seq / step, tflops=tflops, mfu=tflops * 1e12 / peak if peak else None,
               model_flops_per_step=trainer.step_flops)
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    dist.destroy_process_group()
    return row


def run(kind: str, seq: int, steps: int, tiny: bool, timeout: int, warmup: int = 1) -> dict:
    row = dict(kind=kind, seq=seq, steps=steps, warmup=warmup)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{kind}:{seq}:{warmup}", "--steps", str(steps)]
    try:
        p = subprocess.run(cmd + (["--tiny"] if tiny else []), cwd=REPO, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(row, error=f"ran past {timeout} s")
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    if p.returncode != 0 or not lines:
        tail = p.stderr[-600:]
        return dict(row, error="out of memory" if "out of memory" in tail.lower() else tail)
    return dict(row, **json.loads(lines[-1][len("RESULT"):]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="moba:262144,dense:262144",
                    help="kind:seq_len[:warm-up steps, default 1], comma-separated, in order (0 warm-up steps: the "
                         "timed step includes the one-time compilation; for runs too slow to repeat)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up step")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, seq, warmup = args.child.split(":")
        print("RESULT" + json.dumps(child(kind, int(seq), args.steps, args.tiny, int(warmup))), flush=True)
        return
    runs = "moba:512,dense:512" if args.tiny else args.runs
    out = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               command=" ".join(sys.argv), rows=[])
    for spec in runs.split(","):
        kind, seq, *warm = spec.split(":")
        row = run(kind, int(seq), args.steps, args.tiny, args.timeout, int(warm[0]) if warm else 1)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
