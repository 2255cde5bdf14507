"""A finished run directory -> one row of the results table and its loss curve; the table's CSV.

The table has one row per run (``wall_s``: training seconds, evaluation and start-up excluded;
``steps_per_s``: from the median logged step time); ``REQUIRED`` are the columns ``analyse`` needs, so a table from
elsewhere can be analysed too; the tool writes the rest beside them. Curves (``curves.csv`` next to
the table) hold the training loss at every logged step with the FLOPs and training seconds so far.

A run's scalars are read from its TensorBoard events (tensorboard's EventAccumulator, every scalar
kept; an attempt that resumed from an earlier step purges the orphaned later events) or, where the
run wrote none, from ``metrics.jsonl`` (a step logged twice keeps its last value).
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import numpy as np

REQUIRED = ["variant", "params", "non_embedding_params", "budget_flops", "flops", "tokens", "wall_s", "steps_per_s",
            "loss"]
EXTRA = ["name", "group", "kind", "seed", "d_model", "n_layers", "seq_len", "steps", "flops_per_step", "flops_6n",
         "forward_flops_per_seq", "loss_causal", "loss_trailing", "train_loss", "tflops", "process_s", "data"]
COLUMNS = REQUIRED + EXTRA
CURVE_COLUMNS = ["name", "step", "flops", "train_s", "loss"]
_TEXT = {"variant", "name", "group", "kind", "data"}


class ResultsError(ValueError):
    """A table or run directory that cannot be read; the message says which and why."""


def budget_tag(c: float) -> str:
    """3e+15 -> '3e15', 1.5e16 -> '1.5e16': run names and fits.json keys, short and readable."""
    mant, _, exp = f"{c:.2g}".partition("e")
    return f"{mant}e{int(exp or 0)}"


def read_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """{"train/loss": {step: value}, "valid/val_loss": {...}, ...}."""
    tb = os.path.join(run_dir, "tensorboard")
    if os.path.isdir(tb) and any(f.startswith("events.out.tfevents") for f in os.listdir(tb)):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(tb, size_guidance={"scalars": 0})  # 0: keep every value
        acc.Reload()
        return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ResultsError(f"{run_dir}: neither TensorBoard events nor metrics.jsonl")
    out: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            for k, v in rec.items():
                if k not in ("kind", "step", "time") and isinstance(v, (int, float)):
                    out.setdefault(f"{rec['kind']}/{k}", {})[rec["step"]] = float(v)
    return out


def final_step(scalars: dict[str, dict[int, float]]) -> int:
    """The last step evaluated (the trainer evaluates once more when it finishes)."""
    return max(scalars.get("valid/val_loss", {0: 0}))


def curve(scalars: dict[str, dict[int, float]]) -> list[dict[str, float]]:
    """Training loss per logged step with the FLOPs and training seconds so far (step_time_s is
    the mean over the steps since the previous log, evaluation excluded)."""
    loss, flops, step_time = (scalars.get(f"train/{k}", {}) for k in ("loss", "flops", "step_time_s"))
    out, prev, train_s = [], 0, 0.0
    for step in sorted(loss):
        train_s += step_time.get(step, 0.0) * (step - prev)
        prev = step
        out.append({"step": step, "flops": flops.get(step, math.nan), "train_s": train_s, "loss": loss[step]})
    return out


def run_row(run: dict[str, Any], run_dir: str, process_s: float = math.nan) -> dict[str, Any]:
    """The results row of a finished run (``run``: its manifest entry)."""
    scalars = read_scalars(run_dir)
    if final_step(scalars) != run["steps"]:
        raise ResultsError(f"{run_dir}: last evaluation at step {final_step(scalars)}, the run has {run['steps']}")
    valid = {k.split("/", 1)[1]: v[run["steps"]] for k, v in scalars.items()
             if k.startswith("valid/") and run["steps"] in v}
    points = curve(scalars)
    wall = points[-1]["train_s"] if points else math.nan
    tflops = scalars.get("train/tflops_per_device", {})
    row = {k: run.get(k) for k in COLUMNS if k in run}
    # Steps per second from the median logged window after the first (which carries the first
    # step's one-off costs: a short run's mean would be mostly those).
    times = [scalars["train/step_time_s"][s] for s in sorted(scalars.get("train/step_time_s", {}))]
    per_step = float(np.median(times[1:] if len(times) > 1 else times)) if times else math.nan
    row.update(wall_s=wall, steps_per_s=1.0 / per_step, loss=valid["val_loss"],
               loss_causal=valid.get("val_loss_causal", math.nan), loss_trailing=valid.get("val_loss_trailing", math.nan),
               train_loss=points[-1]["loss"] if points else math.nan,
               tflops=sum(tflops.values()) / len(tflops) if tflops else math.nan, process_s=process_s)
    return row


def run_curve(name: str, run_dir: str) -> list[dict[str, Any]]:
    return [{"name": name, **p} for p in curve(read_scalars(run_dir))]


# ---- CSV ------------------------------------------------------------------------------------------
def _number(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() and "nan" not in v.lower() else f


def read_csv(path: str, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise ResultsError(f"{path}: no column {missing[0]!r} (a results table needs {', '.join(required)})")
            return [{k: v if k in _TEXT else _number(v) for k, v in row.items()} for row in reader]
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results table") from None


def read_table(path: str) -> list[dict[str, Any]]:
    rows = read_csv(path, REQUIRED)
    for i, row in enumerate(rows):
        row.setdefault("name", f"row{i}")
        if not row.get("name"):
            row["name"] = f"row{i}"
    return rows


def write_csv(path: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """All of ``columns`` first, any others a row carries after them; written whole, then renamed."""
    extra = sorted({k for r in rows for k in r} - set(columns))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, columns + extra, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.10g}" if isinstance(v, float) else v for k, v in r.items()})
    os.replace(tmp, path)


@contextmanager
def locked(path: str):
    """An exclusive lock beside ``path`` (array tasks of one sweep update the same table)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def merge_into(table: str, rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> None:
    """Add (or replace, by name) rows in ``table`` and their curves in ``curves.csv`` beside it."""
    curves_path = os.path.join(os.path.dirname(os.path.abspath(table)), "curves.csv")
    with locked(table):
        old = read_csv(table) if os.path.exists(table) else []
        names = {r["name"] for r in rows}
        write_csv(table, [r for r in old if r.get("name") not in names] + rows, COLUMNS)
        old_curves = read_csv(curves_path) if os.path.exists(curves_path) else []
        names = {c["name"] for c in curves} | names
        write_csv(curves_path, [c for c in old_curves if c.get("name") not in names] + curves, CURVE_COLUMNS)
