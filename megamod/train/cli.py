"""``megamod-train`` / ``python -m megamod.train``: config -> process groups -> Trainer.

    torchrun --nproc_per_node 2 -m megamod.train --config examples/configs/debug.yaml --train.steps 50
    srun python -m megamod.train --config examples/configs/1b.yaml --parallel.tp 8   (see slurm/)

The launcher (torchrun, Slurm or MPI) is discovered from the environment; a plain
``python -m megamod.train`` runs one process.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

from megamod.config import Config, ConfigError, help_text, load_config, resolve_dp, validate


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="megamod-train", add_help=False,
                                 description="Train a megamod model. Config flags: --section.field value.")
    ap.add_argument("--config", help="YAML config (examples/configs/*.yaml)")
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the config for --world-size ranks and print the rank grid, pipeline split "
                         "and per-rank memory; starts no processes")
    ap.add_argument("--world-size", type=int, default=1, help="ranks to plan for with --dry-run")
    return ap.parse_known_args(argv)


def init_distributed(cfg: Config):
    """Discover the launcher, pick the device, start the world process group, build the grid."""
    import torch
    import torch.distributed as dist

    from megamod.parallel.dims import ParallelDims
    from megamod.parallel.launch import discover_launch_env

    env = discover_launch_env(allow_single=True)
    print(f"[rank {env.rank}] {env.describe()}", flush=True)
    validate(cfg, env.world_size)  # before any process group exists
    # DeepSpeed reads these whatever launched us (Slurm and MPI set their own names).
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=30))
    p = cfg.parallel
    dims = ParallelDims(tp=p.tp, cp=p.cp, dp=resolve_dp(cfg, env.world_size), pp=p.pp, rank=env.rank)
    dims.build_groups()
    return dims, device


def main(argv: list[str] | None = None) -> int:
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(__doc__)
        print(help_text())
        return 0
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"megamod-train: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from megamod.train.dryrun import format_report

        try:
            validate(cfg, args.world_size)
            print(format_report(cfg, args.world_size))
        except ConfigError as e:
            print(f"megamod-train: error: {e}", file=sys.stderr)
            return 2
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.train.device != "cpu" and _cuda() else "cpu")
    try:
        dims, device = init_distributed(cfg)
    except ConfigError as e:
        print(f"megamod-train: error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from megamod.train.signals import StopController
    from megamod.train.trainer import Trainer

    # Handlers go in before the (slow) build, so a USR1 during startup still ends in a requeue
    # and exit_after_minutes counts startup time.
    stop = StopController(cfg.train.exit_after_minutes or None).install()
    try:
        try:
            trainer = Trainer.build(cfg, dims, device, stop=stop)
        except ConfigError as e:  # every rank reads the same files, so every rank stops here
            print(f"megamod-train: error: {e}", file=sys.stderr)
            return 2
        trainer.train()
        dist.barrier()  # no rank tears its process group down under a peer still using it
    finally:
        dist.destroy_process_group()
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
