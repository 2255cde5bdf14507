"""``megamod-train`` / ``python -m megamod.train``: config -> process groups -> Trainer.

    torchrun --nproc_per_node 2 -m megamod.train --config examples/configs/debug.yaml --train.steps 50
    srun python -m megamod.train --config examples/configs/1b.yaml --parallel.tp 8   (see slurm/)

The launcher (torchrun, Slurm or MPI) is discovered from the environment; a plain
``python -m megamod.train`` runs one process.

Exit codes, each with one line on stderr naming the fix (a traceback only for a bug):
0 done; 2 bad input (config, command line, data, a checkpoint this model cannot use);
3 another rank failed or hung (this one names it: parallel/liveness.py); 4 too many skipped
steps in a row (train/guard.py); 5 a checkpoint could not be saved (checkpoint.py).
Restarting helps only after 3 (slurm/common.sh requeues then, torchrun --max-restarts always).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import timedelta

from megamod.config import Config, ConfigError, help_text, load_config, resolve_dp, validate


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="megamod-train", add_help=False, allow_abbrev=False,
                                 description="Train a megamod model. Config flags: --section.field value.")
    ap.add_argument("--config", help="YAML config (examples/configs/*.yaml)")
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the config for --world-size ranks and print the rank grid, pipeline split "
                         "and per-rank memory; starts no processes")
    ap.add_argument("--world-size", type=int, default=1, help="ranks to plan for with --dry-run")
    return ap.parse_known_args(argv)


def init_distributed(cfg: Config):
    """Discover the launcher, pick the device, start the world process group, build the grid.
    Returns the grid, the device and the rank's heartbeat (parallel/liveness.py)."""
    import torch
    import torch.distributed as dist

    from megamod.parallel.dims import ParallelDims
    from megamod.parallel.launch import discover_launch_env
    from megamod.parallel.liveness import Heartbeat, nccl_environment, rendezvous_store

    env = discover_launch_env(allow_single=True)
    print(f"[rank {env.rank}] {env.describe()}", flush=True)
    validate(cfg, env.world_size)  # before any process group exists
    # DeepSpeed reads these whatever launched us (Slurm and MPI set their own names).
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    timeout = cfg.train.collective_timeout_s
    if use_cuda:
        for k, v in nccl_environment(timeout).items():  # torchrun sets some of them; srun and mpirun none
            os.environ.setdefault(k, v)
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    store = rendezvous_store(env.master_addr, env.master_port, env.rank, env.world_size, timeout)
    dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout))
    heartbeat = Heartbeat(env.master_addr, env.master_port, env.rank, env.world_size, timeout).start()
    p = cfg.parallel
    dims = ParallelDims(tp=p.tp, cp=p.cp, dp=resolve_dp(cfg, env.world_size), pp=p.pp, rank=env.rank)
    dims.build_groups(timeout=timedelta(seconds=timeout))
    return dims, device, heartbeat


def main(argv: list[str] | None = None) -> int:
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(__doc__)
        print(help_text())
        return 0
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        return _error(e)
    if args.dry_run:
        from megamod.train.dryrun import format_report

        try:
            validate(cfg, args.world_size)
            print(format_report(cfg, args.world_size))
        except ConfigError as e:
            return _error(e)
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.train.device != "cpu" and _cuda() else "cpu")
    from megamod.parallel.launch import LaunchError

    try:
        dims, device, heartbeat = init_distributed(cfg)
    except (ConfigError, LaunchError) as e:
        return _error(e)
    return _train(cfg, dims, device, heartbeat)


def _train(cfg: Config, dims, device, heartbeat) -> int:
    """Build and train; every way out is one line and an exit code (the module docstring lists them),
    unless it is a bug (a traceback)."""
    import torch.distributed as dist

    from megamod.parallel.liveness import EXIT_PEER_FAILED, RESTART_HINT, gist
    from megamod.train.signals import StopController
    from megamod.train.trainer import Trainer

    # Handlers go in before the (slow) build, so a USR1 during startup still ends in a requeue
    # and exit_after_minutes counts startup time.
    stop = StopController(cfg.train.exit_after_minutes or None).install()
    try:
        trainer = Trainer.build(cfg, dims, device, stop=stop)
        heartbeat.progress = lambda: trainer.state.step
        trainer.train()
        dist.barrier()  # no rank tears its process group down under a peer still using it
    except Exception as e:  # noqa: BLE001  sorted below; what is none of these goes on as a traceback
        code = _exit_code(e)
        if code is not None:  # every rank stops for the same reason (or this rank's input is bad)
            heartbeat.stop(("stop: " if code != 2 else "error: ") + str(e))
            if code == 2 or dims.rank == 0:  # 4 and 5 are agreed on by all ranks: one line is enough
                _error(e, code)
            dist.destroy_process_group()  # every rank is here, or exits for its own bad input
            return code
        if dims.world_size > 1:
            # torchrun and Slurm SIGTERM the survivors of a dead rank: they must live to name it
            # (the launcher's SIGKILL follows in 30 s; the diagnosis takes 2.5 heartbeats, <= 12.5 s).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            reason = heartbeat.diagnose()  # did a peer fail first? (its collective broke ours)
            if heartbeat.blamed_other:
                heartbeat.stop(f"peer failure: {reason}")
                print(f"megamod-train: error: [rank {dims.rank}] {reason}; this rank's collective failed "
                      f"({type(e).__name__}: {gist(e)}); {RESTART_HINT}", file=sys.stderr, flush=True)
                return EXIT_PEER_FAILED  # no destroy_process_group: it can hang on a broken peer
        heartbeat.stop(f"error: {type(e).__name__}: {e}")
        raise
    heartbeat.stop()
    dist.destroy_process_group()
    return 0


def _exit_code(e: BaseException) -> int | None:
    """2: the user's input must change; 4: the numerics guard stopped the run; 5: a checkpoint
    could not be saved. None: not one of ours."""
    from megamod.data.indexed import IndexedDatasetError
    from megamod.train.checkpoint import CheckpointError, CheckpointSaveError
    from megamod.train.data import DataError
    from megamod.train.guard import TooManySkips

    for types, code in (((ConfigError, IndexedDatasetError, DataError, CheckpointError), 2), (TooManySkips, 4),
                        (CheckpointSaveError, 5)):
        if isinstance(e, types):
            return code
    return None


def _error(e: BaseException, code: int = 2) -> int:
    print(f"megamod-train: error: {e}", file=sys.stderr, flush=True)
    return code


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
