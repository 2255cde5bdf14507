"""Run the real trainer CLI in subprocesses (torchrun for several ranks) and read its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A debug model small enough for a few seconds per run on 2 cores; synthetic data so the test
# needs no corpus. log_interval 1 records every step's loss in metrics.jsonl.
BASE = ["--data.synthetic", "true", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
        "--model.n_kv_heads", "4", "--model.ffn_hidden", "128", "--model.vocab_size", "512", "--train.seq_len", "32",
        "--train.micro_batch_size", "4", "--train.log_interval", "1", "--train.eval_interval", "0",
        "--train.eval_steps", "2", "--optim.warmup_steps", "3", "--train.progress", "off"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT") and not k.startswith(("SLURM_", "OMPI_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def run_cmd(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 300,
            python_args: list[str] | None = None) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, *(python_args or ["-m", "megamod.train"]), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *(python_args or ["-m", "megamod.train"]), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == "train":
                out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture
def train():
    def _train(run_dir: Path, *overrides: str, nproc: int = 1, check: bool = True, python_args=None):
        return run_cmd([*BASE, "--train.run_dir", str(run_dir), *overrides], nproc=nproc, check=check,
                       python_args=python_args)
    return _train
