"""What benchmarks/multi_gpu.py reads and writes: a run's metrics.jsonl, the comparison with a
reference, the device's name, and the results table (multi_gpu.md) of every section."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

THROUGHPUT_ISSUE = "1b, 1 H100, ZeRO-1, compiled blocks: 52,872 tokens/s (benchmarks/results/train_throughput.md)"
LONG_BAR = 0.8  # CP MoBA at S over cp ranks: >= 80% of one GPU's per-GPU tokens/s at S/cp
DP_BAR = 0.9  # 1b, ZeRO-1, 8 GPUs: >= 90% of one GPU's tokens/s per GPU
CP_BYTES = re.compile(r"^layers\.(\d+)\.attention\.inner/cp_bytes_(\w+)$")
SELECTED = re.compile(r"^layers\.(\d+)/selected_tokens(_max)?$")
GIB = 2 ** 30


def read_metrics(path: Path) -> dict:
    """Per-step values of a run's train records; ``last``: its last train record whole (module metrics)."""
    out = {"loss": {}, "grad_norm": {}, "tokens_per_s": {}, "mfu": {}, "step_time_s": {}}
    peak, last = [], {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "train":
                for k in out:
                    if k in rec:
                        out[k][rec["step"]] = rec[k]
                peak.append(rec.get("peak_mem_gib", rec.get("peak_rss_gib", 0.0)))
                last = rec
    return {**out, "peak_gib": max(peak, default=None), "last": last}


def compare(ref: dict, run: dict, steps: range) -> dict:
    """Relative loss differences over ``steps``; from step 1 also step 1's loss and grad norm."""
    def rel(key: str, s: int) -> float:
        return abs(run[key][s] - ref[key][s]) / max(abs(ref[key][s]), 1e-12)

    d = [rel("loss", s) for s in steps]
    out = {"mean": sum(d) / len(d), "max": max(d)}
    return {**out, "step1_loss": d[0], "step1_grad_norm": rel("grad_norm", 1)} if steps.start == 1 else out


def cp_bytes_per_layer(last: dict) -> dict[int, float]:
    """Bytes a rank moved per layer and micro-batch (all of cp_bytes_k/v/dk/dv/means, recomputation included)."""
    out: dict[int, float] = {}
    for key, v in last.items():
        m = CP_BYTES.match(key)
        if m:
            out[int(m.group(1))] = out.get(int(m.group(1)), 0.0) + v
    return out


def selected_tokens(last: dict) -> dict[int, tuple[float, float]]:
    """Routed layer -> (selected tokens per micro-batch, mean over ranks; max over ranks)."""
    out: dict[int, list[float]] = {}
    for key, v in last.items():
        m = SELECTED.match(key)
        if m:
            out.setdefault(int(m.group(1)), [0.0, 0.0])[1 if m.group(2) else 0] = v
    return {k: (a, b) for k, (a, b) in sorted(out.items())}


def gpu_query(field: str) -> list[str]:
    """From nvidia-smi, so that the driver itself never creates a CUDA context."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [n.strip() for n in out.splitlines() if n.strip()]


def device_name(device: str) -> str:
    names = gpu_query("name") if device == "cuda" else []
    if device == "cpu":
        return f"CPU ranks over gloo, {os.cpu_count()} cores"
    return f"{len(names)} × {names[0]}" if names else "cuda (nvidia-smi lists no GPU)"


def _f(v, fmt=".2e"):
    return "–" if v is None else format(v, fmt) if isinstance(v, float) else str(v)


def _gib(v) -> str:
    """GiB with 3 significant digits below 10 (the tiny CPU runs move KiB), one decimal above."""
    return "–" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def markdown(r: dict) -> str:
    lines = ["# Multi-GPU correctness and scaling (benchmarks/multi_gpu.py)", "",
             f"- date: {r['date']}", f"- device: {r['device']} (--gpus {r['gpus']}), {r['dtype']}",
             f"- command: `{r['command']}`"] + ([f"- {r['reference']}"] if r.get("reference") else []) + [""]
    for part in (_correctness, _scaling, _tp_profile, _long, _mod, _search):
        lines += part(r)
    if r["skipped"]:
        lines += ["## Skipped", ""] + [f"- {x['section']} {x['flavour']} {x['grid']}: {x['reason']}"
                                       for x in r["skipped"]] + [""]
    return "\n".join(lines)


def _correctness(r: dict) -> list[str]:
    if not (r["correctness"] or r["resume"]):
        return []
    verdict = {True: "pass", False: "**FAIL**", None: "(control)"}
    lines = ["## Correctness: relative loss difference to the 1-GPU reference (micro 2 × accum 4)", "",
             "Tolerance per flavour (3× the control's difference, floors in the script's docstring): "
             + "; ".join(f"{fl}: step 1 {t['step1']:.1e}, mean {t['mean']:.1e}, max {t['max']:.1e}"
                         for fl, t in r["tolerance"].items()), "",
             "| flavour | grid | ranks | micro×accum | step-1 loss | step-1 grad norm | mean | max | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["correctness"]:
        lines.append(f"| {x['flavour']} | {x['grid']} | {x.get('ranks', 1)} | {x.get('batch', '')} | "
                     f"{_f(x.get('step1_loss'))} | {_f(x.get('step1_grad_norm'))} | {_f(x.get('mean'))} | "
                     f"{_f(x.get('max'))} | {verdict[x['pass']]} {x.get('note', '')} |")
    for x in r["resume"]:
        lines.append(f"| {x['flavour']} | resume {x.get('saved_at')} → {x['grid']} at step {x.get('step')} | "
                     f"{x['ranks']} | {x['batch']} | – | – | {_f(x.get('mean'))} | {_f(x.get('max'))} | "
                     f"{verdict[x['pass']]} {x.get('note', '')} |")
    return lines + [""]


def _scaling(r: dict) -> list[str]:
    if not r["scaling"]:
        return []
    lines = ["## Scaling: tokens/s per GPU (median after warm-up), weak-scaling efficiency vs 1 GPU ZeRO-1",
             "", f"For reference, the throughput issue's 1-GPU number: {THROUGHPUT_ISSUE}.", "",
             "| flavour | grid | ZeRO | ranks | micro×accum | seqs/GPU/step | tokens/s/GPU | MFU | peak GiB | "
             "efficiency |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["scaling"]:
        lines.append(f"| {x['flavour']} | {x['grid']} | {x['zero']} | {x['ranks']} | {x['batch']} | "
                     f"{x['seqs_per_gpu_step']:g} | {_f(x.get('tokens_per_s_per_gpu'), ',.0f')} | "
                     f"{_f(x.get('mfu'), '.1%')} | {_f(x.get('peak_gib'), '.1f')} | "
                     f"{_f(x.get('efficiency'), '.1%') if x['ok'] else '**run failed**'} |")
    goal = [x for x in r["scaling"] if x["flavour"] == "1b" and x["grid"] == "dp8-z1" and x.get("efficiency")]
    return lines + ["", f"Target (1b, ZeRO-1, 8 GPUs ≥ {DP_BAR:.0%}): " + (
        f"{goal[0]['efficiency']:.1%}, {'met' if goal[0]['efficiency'] >= DP_BAR else 'NOT met'}"
        if goal else "not measured"), ""]


def _tp_profile(r: dict) -> list[str]:
    if not r.get("tp_profile"):
        return []
    lines = ["## Tensor parallelism's collectives (torch.profiler over the profiled steps, mean over ranks)", "",
             "NCCL: the union of NCCL kernel intervals per step; exposed: the part when no other kernel ran; "
             "per layer: per step / layers (the embedding's and loss's few collectives included).", "",
             "| flavour | grid | step ms | tokens/s/GPU | efficiency | NCCL ms/step | exposed ms/step | "
             "NCCL ms/layer | NCCL kernels/layer/micro-batch | by kind (ms/step) |", "|---" * 10 + "|"]
    for x in r["tp_profile"]:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in x.get("by_kind_ms", {}).items())
        lines.append(f"| {x['flavour']} | {x['grid']} | {_f(x.get('step_ms'), '.1f')} | "
                     f"{_f(x.get('tokens_per_s_per_gpu'), ',.0f')} | {_f(x.get('efficiency'), '.1%')} | "
                     f"{_f(x.get('nccl_ms'), '.1f')} | {_f(x.get('exposed_ms'), '.1f')} | "
                     f"{_f(x.get('per_layer_ms'), '.2f')} | {_f(x.get('kernels_per_layer'), '.1f')} | "
                     f"{kinds or x.get('note', '')} |")
    return lines + [""]


def _long(r: dict) -> list[str]:
    if not r.get("long"):
        return []
    lines = ["## Context parallelism at long sequences (CP MoBA, the 1b flavour)", "",
             "tokens/s per GPU and step time: medians after the first step; MFU as the trainer logs it (MoBA layers "
             "count the pairs they attend, dense layers the full square); bytes: what a rank sent per layer and "
             "micro-batch (K, V, dK, dV, block means; recomputation included); exposed CP communication: the "
             "real step minus the same step with CPComm's transfers replaced by local copies "
             "(benchmarks/train_probe.py --skip-cp-comm).", "",
             "| model | run | S | ranks | step s | tokens/s/GPU | GFLOP/token | MFU | peak GiB | GiB/layer "
             "(MoBA, dense) | cp_work max/mean | vs 1 GPU at S/cp | exposed CP comm |", "|---" * 13 + "|"]
    for x in r["long"]:
        vs = x.get("vs_1gpu")
        bar = "" if vs is None else f"**{vs:.1%}** ({'met' if vs >= LONG_BAR else 'NOT met'}, bar {LONG_BAR:.0%})"
        exp = x.get("exposed_s")
        lines.append(f"| {x['variant']} | {x['run']} | {x['seq']:,} | {x['ranks']} | {_f(x.get('step_s'), '.2f')} | "
                     f"{_f(x.get('tokens_per_s_per_gpu'), ',.0f')} | {_f(x.get('gflop_per_token'), '.2f')} | "
                     f"{_f(x.get('mfu'), '.1%')} | {_f(x.get('peak_gib'), '.1f')} | "
                     f"{_gib(x.get('moba_layer_gib'))}, {_gib(x.get('dense_layer_gib'))} | "
                     f"{_f(x.get('work_imbalance'), '.3f')} | {bar} | "
                     + ("" if exp is None else f"{exp:.2f} s ({x['exposed_frac']:.1%} of the step)")
                     + ("" if "profiled_nccl_s" not in x else
                        f"; profiler, last step: NCCL {x['profiled_nccl_s']:.2f} s, {x['profiled_exposed_s']:.2f} s "
                        f"of it exposed, step {x['profiled_wall_s']:.2f} s")
                     + (f" {x['note']}" if x.get("note") else "") + " |")
    return lines + [""]


def _mod(r: dict) -> list[str]:
    if not r.get("mod"):
        return []
    lines = ["## Mixture-of-Depths under CP (examples/configs/1b_mod_moba_long.yaml)", "",
             "Routed tokens per rank and micro-batch over the routed layers (logged selected_tokens: mean over "
             "ranks; _max: the largest rank); expected: capacity · S/cp.", "",
             "| S | ranks | step s | tokens/s/GPU | MFU | peak GiB | routed layers | routed tokens/rank (mean, max) | "
             "expected | step vs no MoD |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["mod"]:
        lines.append(f"| {x['seq']:,} | {x['ranks']} | {_f(x.get('step_s'), '.2f')} | "
                     f"{_f(x.get('tokens_per_s_per_gpu'), ',.0f')} | {_f(x.get('mfu'), '.1%')} | "
                     f"{_f(x.get('peak_gib'), '.1f')} | {x.get('routed_layers', '–')} | "
                     f"{_f(x.get('selected_mean'), ',.0f')}, {_f(x.get('selected_max'), ',.0f')} | "
                     f"{_f(x.get('expected'), ',.0f')} | {_f(x.get('vs_dense'), '.3f')} {x.get('note', '')} |")
    return lines + [""]


def _search(r: dict) -> list[str]:
    if not r.get("search"):
        return []
    lines = ["## The longest sequence that trains (1b_moba_long.yaml, dry run first)", "",
             "| S | ranks | dry-run GiB/rank | limit GiB | result | peak GiB | step s | tokens/s/GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["search"]:
        lines.append(f"| {x['seq']:,} | {x['ranks']} | {_gib(x.get('dry_run_gib'))} | "
                     f"{_gib(x.get('limit_gib'))} | {x['status']} | {_f(x.get('peak_gib'), '.1f')} | "
                     f"{_f(x.get('step_s'), '.2f')} | {_f(x.get('tokens_per_s_per_gpu'), ',.0f')} |")
    best = [x for x in r["search"] if x["status"] == "trained"]
    return lines + ["", "Longest trained: " + (f"S = {best[-1]['seq']:,}, peak {_f(best[-1].get('peak_gib'), '.1f')} "
                                               "GiB a rank" if best else "none"), ""]
