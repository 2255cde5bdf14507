"""benchmarks/multi_gpu.py (issues #10, #27) on CPU ranks over gloo: the script the multi-GPU machines
will run, with the tiny model, so its grids, comparisons, cross-grid resume, CP sections and results
file are exercised wherever the tests run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from conftest import REPO, _env  # noqa: F401  (pytest puts this dir on sys.path)

SCRIPT = str(REPO / "benchmarks" / "multi_gpu.py")


def _script(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_correctness_resume_and_scaling_on_cpu_ranks(tmp_path):
    """tp2, pp2 and tp2×pp2 follow the 1-rank reference (fp32: within 1e-4 mean, 1e-5 at step 1);
    tp2×pp2's step-4 checkpoint resumes at tp2×dp2 and follows it too; the scaling baseline row and
    the results table exist. Then the same comparison, reusing the references, must FAIL for runs
    whose learning rate was doubled (same step 1, other trajectory): the check is not vacuous."""
    out, work = tmp_path / "out", tmp_path / "work"
    tiny = ["--tiny", "--device", "cpu", "--gpus", "4", "--work-dir", str(work)]
    _script(*tiny, "--variants", "dense", "--grids", "tp2,pp2,tp2-pp2,pp2-dp2", "--resume", "tp2-pp2:tp2-dp2",
            "--out", str(out))
    res = json.loads((out / "multi_gpu.json").read_text())
    assert res["dtype"] == "fp32" and res["tolerance"]["tiny"]["step1"] >= 1e-5
    rows = {r["grid"]: r for r in res["correctness"]}
    assert {"tp2", "pp2", "tp2-pp2"} <= set(rows), sorted(rows)
    for grid in ("tp2", "pp2", "tp2-pp2"):
        assert rows[grid]["pass"] is True, rows[grid]
        assert rows[grid]["mean"] <= 1e-4 and rows[grid]["step1_grad_norm"] <= 1e-5, rows[grid]
    (resume,) = res["resume"]
    assert resume["pass"] is True and resume["saved_at"] == "tp2-pp2" and resume["grid"] == "tp2-dp2", resume
    assert res["runs"]["resume/tiny/tp2-pp2_to_tp2-dp2"]["resumed"]
    assert sorted(res["runs"]["resume/tiny/tp2-pp2_to_tp2-dp2"]["loss"]) == ["5", "6", "7", "8"]
    # the 1-rank baseline and pp2-dp2 (numbers only; 2 cores measure no scaling), which ends without a
    # checkpoint: the path where a pipeline rank once tore its process group down under its peer
    scaling, pipe = res["scaling"]
    assert scaling["grid"] == "dp1-z1" and scaling["ok"] and scaling["tokens_per_s_per_gpu"] > 0, scaling
    assert scaling["efficiency"] == 1.0
    assert pipe["grid"] == "pp2-dp2" and pipe["ok"] and pipe["batch"] == "8×8", pipe
    assert not list(work.glob("scaling/*/*/checkpoints/step_*"))
    md = (out / "multi_gpu.md").read_text()
    for text in ("- date: ", "- device: CPU ranks over gloo", "- command: `python benchmarks/multi_gpu.py --tiny",
                 "| tiny | tp2 | 2 | 2×4 |", "| tiny | resume tp2-pp2 → tp2-dp2 at step 4 | 4 | 2×2 |",
                 "| tiny | dp1-z1 | 1 | 1 | 8×1 | 8 |"):
        assert text in md, (text, md)
    assert "**FAIL**" not in md

    bad = _script(*tiny, "--which", "correctness", "--variants", "dense", "--grids", "tp2", "--resume", "none",
                  "--reference", str(out / "multi_gpu.json"), "--perturb=--optim.lr 0.006", "--out",
                  str(tmp_path / "bad"), check_rc=1)
    assert "[reuse] correctness/tiny/1gpu " in bad.stdout
    (row,) = [r for r in json.loads((tmp_path / "bad" / "multi_gpu.json").read_text())["correctness"]
              if r["grid"] == "tp2"]
    assert row["pass"] is False and row["step1_loss"] <= 1e-5 and row["mean"] > 1e-3, row


def test_plan_for_eight_gpus_runs_nothing(tmp_path):
    """--plan lists the issue's grids for 8 GPUs with dry-run memory and the reasons for skips: the
    TP/PP/CP correctness grids of both variants, scaling, the profiled tp grids, the long-sequence
    runs, and a search whose 3M and 4M lengths the dry run rules out (138 and 182 GiB a rank)."""
    out = _script("--plan", "--gpus", "8", "--device", "cuda", "--which", "correctness,scaling,tp-profile,long,mod,"
                  "search", "--scaling-flavours", "1b", "--out", str(tmp_path / "out")).stdout
    assert not (tmp_path / "out").exists()
    for grid in ("tp8", "pp4", "tp2-pp2-dp2", "cp2", "cp8", "dp8-z1", "dp8-z2", "tp4-dp2", "pp2-dp4", "tp4-dp1"):
        assert f"  {grid} " in out, (grid, out)
    assert "skip: heads (4 query, 4 kv) are not divisible by --parallel.tp 8" in out  # debug at tp8
    assert "resume across grids (SAVE:AT): tp2-pp2-dp2:tp2-dp4" in out
    assert "correctness 350m+moba:" in out and "resume across grids (SAVE:AT): cp8:cp4-dp2" in out
    for run in ("long hybrid 1gpu                131072      1", "long hybrid cp8 skip-comm      1048576      8",
                "long moba cp8", "mod cp8", "search cp8                     2097152      8"):
        assert run in out, (run, out)
    lines = {line.split()[2]: line for line in out.splitlines() if line.startswith("  search cp8")}
    assert lines["2097152"].endswith("run") and "skip: dry run 181.9 GiB a rank > " in lines["4194304"], lines


def test_probe_exposed_time_arithmetic():
    """train_probe's overlap arithmetic on a hand-made trace (µs): NCCL 0-10 and 20-30 against compute
    5-12 and 22-24, so 10 + 10 of comm of which 5 (0-5) + 8 (20-22, 24-30) run with nothing else."""
    spec = importlib.util.spec_from_file_location("train_probe", REPO / "benchmarks" / "train_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    k = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}  # noqa: E731
    events = [k("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 0, 10), k("ncclDevKernel_AllGather_RING_LL", 20, 10),
              k("sm90_gemm", 5, 7), k("triton_fused", 22, 2), {"ph": "X", "cat": "cpu_op", "name": "nccl:x",
                                                              "ts": 0, "dur": 100}]
    s = probe.summarise(events, steps=2)
    assert s["nccl_ms"] == 20 / 1e3 / 2 and s["exposed_ms"] == 13 / 1e3 / 2 and s["compute_ms"] == 9 / 1e3 / 2, s
    assert s["by_kind_ms"] == {"AllGather": 5e-3, "AllReduce": 5e-3} and s["nccl_kernels"] == 1.0, s
    assert probe.uncovered([(0, 10)], [(0, 10)]) == 0 and probe.uncovered([(0, 10)], []) == 10


def test_cp_sections_on_cpu_ranks(tmp_path):
    """The issue-#27 sections on 2 gloo ranks with the tiny model: CP MoBA correctness (cp2 against one
    rank, fp32 bounds); tp2 under the profiler (steps 7-8 profiled, 3-6 timed); the long run at S = 256
    over cp 2 beside one rank at 128, with the CP-transfer skip (its losses must differ from the real
    run's: the switch took effect), bytes per layer and the profiler's summary; MoD under CP with
    exactly capacity·S/cp = 16 routed tokens on every rank; and a search whose 512 is ruled out by
    --mem-limit-gib, between the dry run's 0.0034 GiB at 256 and 0.0043 GiB at 512 (the 256 run is
    the long run's, reused)."""
    out, work = tmp_path / "out", tmp_path / "work"
    _script("--tiny", "--device", "cpu", "--gpus", "2", "--work-dir", str(work), "--out", str(out),
            "--which", "correctness,tp-profile,long,mod,search", "--grids", "cp2,tp2-dp1",
            "--variants", "moba", "--resume-moba", "none", "--tp-profile-steps", "7:8",
            "--long-cp", "2", "--long-variants", "hybrid", "--long-profile",
            "--search-lengths", "256,512", "--mem-limit-gib", "0.0039")
    res = json.loads((out / "multi_gpu.json").read_text())
    (cp2,) = [r for r in res["correctness"] if r["grid"] == "cp2"]
    assert cp2["flavour"] == "tiny+moba" and cp2["pass"] is True and cp2["step1_grad_norm"] <= 1e-5, cp2
    (tp,) = res["tp_profile"]  # gloo runs no GPU kernels: the plumbing, with zero NCCL time
    assert tp["grid"] == "tp2-dp1" and tp["tokens_per_s_per_gpu"] > 0 and tp["nccl_ms"] == 0 and tp["wall_ms"] > 0, tp
    assert [p["steps"] for p in res["runs"]["tp_profile/tiny/tp2-dp1"]["profile"]] == [2, 2]
    ref, real, skip = res["long"]
    assert (ref["seq"], ref["ranks"], real["seq"], real["ranks"]) == (128, 1, 256, 2), res["long"]
    assert real["vs_1gpu"] == real["tokens_per_s_per_gpu"] / ref["tokens_per_s_per_gpu"] > 0
    assert real["exposed_s"] == real["step_s"] - skip["step_s"] and skip["run"].endswith("transfers skipped")
    runs = res["runs"]
    loss_real, loss_skip = runs["long/hybrid/cp2-S256"]["loss"], runs["long/hybrid/cp2-S256-skipcomm"]["loss"]
    assert loss_real["1"] != loss_skip["1"], (loss_real, loss_skip)
    assert real["moba_layer_gib"] > 0 and real["dense_layer_gib"] > 0  # layer 0 MoBA, 1-3 dense
    assert [p["steps"] for p in runs["long/hybrid/cp2-S256"]["profile"]] == [1, 1]  # one summary a rank
    (mod,) = res["mod"]
    assert mod["routed_layers"] == 2 and mod["selected_mean"] == mod["selected_max"] == mod["expected"] == 16, mod
    assert mod["vs_dense"] > 0
    first, second = res["search"]
    assert first["status"] == "trained" and second["status"].startswith("skip: dry run"), res["search"]
    assert not any(k.startswith("search/") for k in runs)
    md = (out / "multi_gpu.md").read_text()
    for text in ("## Context parallelism at long sequences", "| hybrid | cp 2 | 256 | 2 |", "## Mixture-of-Depths",
                 "Longest trained: S = 256"):
        assert text in md, (text, md)
