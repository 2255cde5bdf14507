"""A tiny isoFLOP sweep through tools/isoflop.py and the real trainer CLI: 3 budgets × 3 sizes ×
2 variants of debug-sized models (d 32-64, 2-4 layers, seq 32, 11-231 steps, synthetic data,
one process per run) is planned, run, killed mid-run (SIGKILL to the whole process group),
resumed without redoing the finished runs (the killed one from its checkpoint), and analysed to
every chart, fits.json and the table."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, _env

SPEC = """\
config: examples/configs/debug.yaml
overrides: [--data.synthetic, "true", --model.vocab_size, "256", --train.seq_len, "32", --train.micro_batch_size, "4",
            --train.log_interval, "2", --train.eval_interval, "0", --train.eval_steps, "2", --optim.warmup_steps, "2",
            --train.progress, "off", --checkpoint.interval, "20", --optim.zero_stage, "0",
            --train.trailing_loss_tokens, "8"]
rule: {aspect: 16, head_dim: 16, ffn_multiple: 16}
min_steps: 8
tolerance: 0.1   # a handful of steps cannot land within 1%; the planner checks whatever it is told
groups:
  - {name: tiny, budgets: [2.0e9, 3.0e9, 4.5e9], variants: [dense, mod], depths: [2, 3, 4]}
"""
CHARTS = ["isoflop_curves", "normalised", "loss_vs_flops", "loss_vs_wallclock", "flops_steps_bars", "scaling",
          "scaling_trailing"]


def tool(*args: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "isoflop.py"), *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_tiny_sweep_plans_runs_resumes_and_analyses(tmp_path):
    (tmp_path / "tiny.yaml").write_text(SPEC)
    manifest_path, sweep = tmp_path / "tiny.json", tmp_path / "runs"
    tool("plan", str(tmp_path / "tiny.yaml"), "--out", str(manifest_path))
    runs = json.loads(manifest_path.read_text())["runs"]
    assert len(runs) == 18
    victim = max(runs, key=lambda r: r["steps"])  # the longest run: time to catch it mid-way
    before = runs[: runs.index(victim)]

    # Run until the victim has a complete checkpoint short of its last step, then kill everything.
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "isoflop.py"), "run", str(manifest_path),
                             "--sweep-dir", str(sweep)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    ckpts, deadline = sweep / victim["name"] / "checkpoints", time.monotonic() + 400
    while not any(ckpts.glob("step_*/megamod_complete.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (sweep / victim["name"] / "isoflop_done.json").exists(), "the victim finished before the kill"
    finished = {r["name"]: (sweep / r["name"] / "metrics.jsonl").stat().st_mtime_ns for r in before}
    assert all((sweep / n / "isoflop_done.json").exists() for n in finished)

    out = tool("run", str(manifest_path), "--sweep-dir", str(sweep)).stdout
    for name, mtime in finished.items():  # skipped, not retrained
        assert f"skip {name}: done marker" in out
        assert (sweep / name / "metrics.jsonl").stat().st_mtime_ns == mtime
    log = (sweep / victim["name"] / "logs" / "isoflop.out").read_text()
    assert "resumed from" in log and f"done: {victim['steps']} steps" in log, log[-2000:]

    table = (sweep / "results.csv").read_text().splitlines()
    assert len(table) == 19 and table[0].startswith("variant,params,non_embedding_params,budget_flops,flops,tokens,"
                                                    "wall_s,steps_per_s,loss")
    for source in (["--runs", str(sweep)], ["--table", str(sweep / "results.csv")]):  # events, then the table
        out_dir = tmp_path / f"analysis_{source[0][2:]}"
        tool("analyse", *source, "--out", str(out_dir), "--scaling-variants", "dense", "mod")
        fits = json.loads((out_dir / "fits.json").read_text())
        assert sorted(fits["charts"]) == sorted(f"{c}.png" for c in CHARTS), fits["skipped"]
        for c in CHARTS:
            assert (out_dir / f"{c}.png").stat().st_size > 10_000 and (out_dir / f"{c}.csv").exists()
        assert sorted(fits["variants"]) == ["dense", "mod"]
        assert sorted(fits["variants"]["dense"]["budgets"]) == ["2e9", "3e9", "4.5e9"]
        assert len((out_dir / "results.csv").read_text().splitlines()) == 19
        rows = [dict(zip(table[0].split(","), line.split(","))) for line in table[1:]]
        assert all(math.isfinite(float(r["loss"])) and math.isfinite(float(r["loss_trailing"])) for r in rows)
