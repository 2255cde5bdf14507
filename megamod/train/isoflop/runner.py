"""Running a manifest: every run is an ordinary megamod run directory, trained through the real CLI
(``python -m megamod.train``, or torchrun), one after another here or one per Slurm array task
(slurm/isoflop_array.sbatch).

A run is finished when its directory holds ``DONE`` (its results row, written once the trainer
exited 0 with its last step evaluated) or the results table already has a row of its name (a
sweep run in pieces on machines that do not keep run directories). Finished runs are skipped. An
unfinished run is started with the same command, and the trainer resumes it from its newest
complete checkpoint (``--checkpoint.interval``), so a killed sweep resumes by running it again.
After every finished run the table (and ``curves.csv`` beside it) is rewritten, so a sweep cut
short still leaves every finished run's row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from megamod.config import load_config
from megamod.train.isoflop.plan import manifest_path_dir, read_document
from megamod.train.isoflop.results import ResultsError, merge_into, read_csv, run_curve, run_row

DONE = "isoflop_done.json"
LOG = "isoflop.out"


def load_manifest(path: str) -> dict[str, Any]:
    manifest = read_document(path, "manifest", "write one with: tools/isoflop.py plan")
    if not isinstance(manifest, dict) or manifest.get("version") != 1 or "runs" not in manifest:
        raise ValueError(f"manifest {path}: not a version-1 isoFLOP manifest (tools/isoflop.py plan writes one)")
    return manifest


def default_sweep_dir(manifest_path: str) -> str:
    return os.environ.get("MEGAMOD_SWEEP_DIR") or manifest_path_dir(manifest_path)


def select(manifest: dict[str, Any], pieces: list[int] | None = None, names: list[str] | None = None) -> list[dict]:
    runs = manifest["runs"]
    if names:
        unknown = sorted(set(names) - {r["name"] for r in runs})
        if unknown:
            raise ValueError(f"--only {unknown[0]}: no such run in the manifest")
        runs = [r for r in runs if r["name"] in names]
    if pieces:
        runs = [r for r in runs if r["piece"] in pieces]
    return runs


def train_command(manifest: dict[str, Any], run: dict[str, Any], run_dir: str, nproc: int = 1) -> list[str]:
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launch, "-m", "megamod.train", "--config", manifest["config"], *run["args"], "--train.run_dir", run_dir]


def data_fingerprint(manifest: dict[str, Any], run: dict[str, Any]) -> str:
    """'synthetic', or the first 12 hex digits of the sha1 of the datasets' .idx files (document
    lengths in tokens: the same corpus and tokenizer give the same fingerprint)."""
    cfg = load_config(manifest["config"], run["args"])
    if cfg.data.synthetic:
        return "synthetic"
    h = hashlib.sha1()
    for p in cfg.data.paths:
        if os.path.exists(p + ".idx"):
            with open(p + ".idx", "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


def finished(run: dict[str, Any], run_dir: str, table_names: set[str]) -> str | None:
    """Why the run counts as finished, or None."""
    if os.path.exists(os.path.join(run_dir, DONE)):
        return "done marker"
    if run["name"] in table_names:
        return "in the results table"
    return None


def record(manifest: dict[str, Any], run: dict[str, Any], run_dir: str, table: str,
           process_s: float = math.nan) -> dict[str, Any] | None:
    """If the run reached its last step: write its done marker, add it to the table; its row."""
    if not os.path.isdir(run_dir):
        return None
    try:
        row = run_row(run, run_dir, process_s)
    except ResultsError:
        return None
    row["data"] = data_fingerprint(manifest, run)
    merge_into(table, [row], run_curve(run["name"], run_dir))
    tmp = os.path.join(run_dir, DONE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, DONE))
    return row


class _Forward:
    """SIGINT/SIGTERM to the runner: passed on to the running trainer (which checkpoints and
    exits), and no further run is started."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.stop: str | None = None

    def __enter__(self) -> "_Forward":
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        self.stop = signal.Signals(signum).name
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def run_sweep(manifest_path: str, sweep_dir: str | None = None, table: str | None = None,
              pieces: list[int] | None = None, names: list[str] | None = None, nproc: int = 1,
              time_limit_s: float | None = None, dry_run: bool = False,
              echo: Callable[[str], None] = print) -> int:
    """Train every unfinished selected run; 0 when all of them are finished afterwards."""
    start = time.monotonic()
    manifest = load_manifest(manifest_path)
    sweep_dir = sweep_dir or default_sweep_dir(manifest_path)
    table = table or os.path.join(sweep_dir, "results.csv")
    table_names = {r.get("name") for r in read_csv(table)} if os.path.exists(table) else set()
    runs = select(manifest, pieces, names)
    failed, todo, spent, estimated = [], [], 0.0, 0.0
    for run in runs:
        rdir = os.path.join(sweep_dir, run["name"])
        why = finished(run, rdir, table_names)
        if why is None and record(manifest, run, rdir, table) is not None:
            why = "finished before its marker was written"  # killed between the trainer's end and the marker
        if why:
            echo(f"skip {run['name']}: {why}")
        else:
            todo.append(run)
    with _Forward() as fwd:
        for i, run in enumerate(todo):
            rdir = os.path.join(sweep_dir, run["name"])
            cmd = train_command(manifest, run, rdir, nproc)
            if dry_run:
                echo(" ".join(cmd))
                continue
            predicted = run["est_gpu_s"] * (spent / estimated if estimated else 1.0)
            left = time_limit_s - (time.monotonic() - start) if time_limit_s else math.inf
            if fwd.stop or predicted > left:
                reason = f"got {fwd.stop}" if fwd.stop else f"time limit: {run['name']} needs ~{predicted:.0f} s, {left:.0f} s left"
                echo(f"stopping ({reason}); {len(todo) - i} runs left: run the same command again to continue")
                return 1
            os.makedirs(os.path.join(rdir, "logs"), exist_ok=True)
            echo(f"[{i + 1}/{len(todo)}] {run['name']}: {run['steps']} steps, {run['flops']:.3g} FLOPs "
                 f"(~{predicted:.0f} s); log {os.path.join(rdir, 'logs', LOG)}")
            t0 = time.monotonic()
            with open(os.path.join(rdir, "logs", LOG), "a") as log:
                fwd.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                rc = fwd.child.wait()
                fwd.child = None
            took = time.monotonic() - t0
            row = record(manifest, run, rdir, table, took) if rc == 0 else None
            if row is None:
                tail = _tail(os.path.join(rdir, "logs", LOG))
                echo(f"    {run['name']} did not finish (exit {rc}) after {took:.1f} s; last lines:\n{tail}")
                if fwd.stop:
                    echo(f"stopping (got {fwd.stop}); run the same command again to resume {run['name']}")
                    return 1
                failed.append(run["name"])
                continue
            spent, estimated = spent + took, estimated + run["est_gpu_s"]
            echo(f"    done in {took:.1f} s: loss {row['loss']:.4f}, {row['steps_per_s']:.2f} steps/s")
    if failed:
        echo(f"{len(failed)} runs failed: {', '.join(failed)}")
        return 1
    echo(f"all {len(runs)} selected runs finished; table {table}")
    return 0


def _tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join("      " + line for line in f.readlines()[-lines:])


def task(manifest_path: str, index: int, sweep_dir: str | None = None) -> list[str]:
    """A Slurm array task's run: [status ('todo' or 'done'), run dir, config, trainer flags...]."""
    manifest = load_manifest(manifest_path)
    if not 0 <= index < len(manifest["runs"]):
        raise ValueError(f"manifest {manifest_path} has {len(manifest['runs'])} runs, no run {index}")
    run = manifest["runs"][index]
    sweep_dir = sweep_dir or default_sweep_dir(manifest_path)
    rdir = os.path.join(sweep_dir, run["name"])
    table = os.path.join(sweep_dir, "results.csv")
    names = {r.get("name") for r in read_csv(table)} if os.path.exists(table) else set()
    status = "done" if finished(run, rdir, names) else "todo"
    return [status, rdir, manifest["config"], *run["args"]]


def record_task(manifest_path: str, index: int, sweep_dir: str | None = None) -> dict[str, Any] | None:
    manifest = load_manifest(manifest_path)
    run = manifest["runs"][index]
    sweep_dir = sweep_dir or default_sweep_dir(manifest_path)
    return record(manifest, run, os.path.join(sweep_dir, run["name"]), os.path.join(sweep_dir, "results.csv"))
