"""CPU step time of the debug model: the reference number later changes are compared against.

    .venv/bin/python benchmarks/cpu_step.py [--steps 30] [--threads 2] [extra --section.field overrides]

One process (gloo world of 1), the real Trainer (DeepSpeed engine, ZeRO-1, fp32), synthetic
tokens; times forward + backward + optimizer per step, warm-up excluded, and prints the median,
the spread (p10/p90), tokens/s and achieved GFLOP/s (analytic FLOPs, megamod.model.flops).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args, overrides = ap.parse_known_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    from megamod.config import load_config
    from megamod.parallel.dims import ParallelDims
    from megamod.model.flops import train_flops_per_step
    from megamod.train.trainer import Trainer

    cfg = load_config(None, ["--data.synthetic", "true", "--train.steps", str(args.steps + args.warmup),
                             "--train.run_dir", "/tmp/megamod-cpu-bench", "--checkpoint.resume", "false",
                             "--logging.tensorboard", "false", "--train.progress", "off", *overrides])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    dims = ParallelDims(tp=1, cp=1, dp=1, pp=1, rank=0)
    dims.build_groups()
    trainer = Trainer.build(cfg, dims, torch.device("cpu"))
    from megamod.train.data import micro_batches

    batches = micro_batches(trainer.train_data, cfg.train.micro_batch_size, 0, 1, 0)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.train_step(batches).item()
        times.append(time.perf_counter() - t0)
    times = sorted(times[args.warmup:])
    med = statistics.median(times)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len
    flops = train_flops_per_step(cfg, cfg.train.micro_batch_size * cfg.train.grad_accum)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {args.threads}")
    print(f"model: {cfg.model.flavour} (n_layers {cfg.model.n_layers}, d {cfg.model.d_model}), "
          f"batch {cfg.train.micro_batch_size}x{cfg.train.seq_len}, grad_accum {cfg.train.grad_accum}")
    print(f"step time median {med * 1e3:.1f} ms (p10 {times[len(times) // 10] * 1e3:.1f}, "
          f"p90 {times[9 * len(times) // 10] * 1e3:.1f}) over {args.steps} steps")
    print(f"tokens/s {tokens / med:,.0f}   GFLOP/s {flops / med / 1e9:.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
