"""Multi-GPU correctness and scaling of the real trainer CLI (issue #10). One call per node:

    python benchmarks/multi_gpu.py --gpus 8                        # correctness + scaling, results in $OUT or --out
    python benchmarks/multi_gpu.py --gpus 8 --plan                 # grids, skips and memory per rank; runs nothing
    python benchmarks/multi_gpu.py --gpus 8 --which scaling --scaling-flavours 1b --grids dp2-z1,dp8-z1
    python benchmarks/multi_gpu.py --tiny --device cpu --gpus 4    # CPU/gloo smoke test (tests/integration)

Every run is ``python -m torch.distributed.run --standalone --nproc_per_node N -m megamod.train
--config examples/configs/<flavour>.yaml ...`` on synthetic data (plain ``python -m megamod.train``
for one rank); losses, grad norms and tokens/s come from the run's ``metrics.jsonl`` (log interval 1).
The driver never imports CUDA, so the GPUs stay free for the ranks.

Correctness (``debug`` and ``350m``, bf16 on GPU; fp32 on CPU or with --fp32): every grid trains
``--steps`` (20) steps on the reference's global batch, 1 GPU × micro-batch 2 × accumulation 4 = 8
sequences (dp ranks accumulate 4/dp; PP needs accumulation >= pp). Same seed and the same samples
per step (the sampler splits each step's contiguous samples over dp and accumulation), so only the
reduction order differs. Numbers per grid, relative to the reference:
  * step 1's loss and grad norm: the same weights, so forward, backward and the gradient reductions
    are checked before any update (a missing or doubled dp/tp reduction scales the grad norm by dp
    or tp, which Adam and clipping would hide from later losses);
  * mean and max over all steps of |Δloss|/loss: the trajectory, which drifts as rounding compounds.
Tolerance, measured per flavour: a control run, 1 GPU × micro-batch 8 × accumulation 1 (the same
mathematics, another accumulation order and other matmul shapes), shows what reduction order alone
does; each number may be 3× the control's (TP's all-reduces of bf16 partial sums round at more
places than accumulation does), but no bound is tighter than a floor: bf16 1e-2 at step 1 and
2e-2 mean (max: 3× the mean bound); fp32 1e-5 and 1e-4. bf16 keeps 8 significant bits (unit
roundoff 2^-8 ≈ 3.9e-3), so one re-split matmul output moves by ~0.4%; a mean over 8·seq tokens
moves less, and 1e-2 at step 1 and 2e-2 over 20 steps (~2.5 and 5 ulps) are where the floors sit
when the control agrees by luck. Real bugs are larger: a wrong shard, stage order or lost micro-batch
moves step 1's loss or grad norm by >= 10%. A grid failing narrowly in bf16 can be rerun with
--fp32 (the trainer's --train.dtype fp32), where only summation order is left (floors 1e-5/1e-4).
Resume: the ``--resume SAVE:AT`` grid's run also checkpoints at step steps/2; a copy of that
checkpoint resumes on grid AT (another TP/PP/DP shape, through DeepSpeed's universal checkpoint,
megamod/train/reshard.py), and its steps steps/2+1..steps are held to the same mean/max bounds
against the reference; the run must print "resumed from".

Scaling (``1b`` and ``2b``, each flavour's YAML: micro-batch, ZeRO stage, no recompute; blocks
compiled on GPU as in the throughput issue): tokens/s per GPU = the median over steps after the
first steps/4 of the run's tokens_per_s (global tokens per step / step time) divided by its ranks.
Weak scaling: the micro-batch per rank is fixed and the global batch grows with dp. dp only at
1, 2, 4, ... GPUs under ZeRO-1, and all GPUs under ZeRO-2; tp=2 and tp=4 and pp=2 fill the node
with dp (pp runs 4·pp micro-batches a step, bubble (pp-1)/(4pp+pp-1)). Efficiency = tokens/s per
GPU ÷ the 1-GPU ZeRO-1 run's on the same machine in the same call (or --reference's). The issue's
target: 1b, ZeRO-1, 8 GPUs >= 0.90. Scaling runs save no checkpoint (1b: ~18 GB a run).

Grids that do not fit --gpus or the model (heads, layers) are skipped with the reason. Results
(table + JSON) are rewritten after every run, so a call cut off by a time limit keeps what ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from megamod.config import ConfigError, load_config, validate  # noqa: E402

FLOORS = {"bf16": (1e-2, 2e-2), "fp32": (1e-5, 1e-4)}  # (step-1 bound, mean-over-steps bound), relative
MICRO, ACCUM = 2, 4  # correctness: global batch 8 sequences
# --tiny: the integration tests' model (4 layers so pp=4 fits), a few seconds per run on a CPU.
TINY = ["--model.n_layers", "4", "--model.d_model", "64", "--model.n_heads", "4", "--model.n_kv_heads", "4",
        "--model.ffn_hidden", "128", "--model.vocab_size", "512", "--train.seq_len", "32"]
THROUGHPUT_ISSUE = "1b, 1 H100, ZeRO-1, compiled blocks: 52,872 tokens/s (benchmarks/results/train_throughput.md)"


@dataclass(frozen=True)
class Grid:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0  # 0: the flavour's YAML stage
    show_dp: bool = False  # scaling grids always name dp ("tp4-dp1"), apart from correctness's "tp4"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        parts = [f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("dp", self.dp))
                 if v > 1 or (k == "dp" and self.show_dp)]
        return "-".join(parts or ["dp1"]) + (f"-z{self.zero}" if self.zero else "")

    @classmethod
    def parse(cls, name: str) -> "Grid":
        kv = dict(re.findall(r"(tp|pp|dp|z)(\d+)", name))
        return cls(*(int(kv.get(k, 1)) for k in ("tp", "pp", "dp")), zero=int(kv.get("z", 0)))


def correctness_grids(n: int) -> list[Grid]:
    mixed = [Grid(tp=2, pp=2)] if 4 <= n < 8 else []  # the issue's tp2×pp2×dp2 where it won't fit
    return [Grid(tp=t) for t in (2, 4, 8)] + [Grid(pp=p) for p in (2, 4)] + mixed + [Grid(tp=2, pp=2, dp=2)]


def scaling_grids(n: int) -> list[Grid]:
    dp = [Grid(dp=d, zero=1) for d in (1, 2, 4, 8, 16, 32) if d <= max(n, 8)]  # up to 8 shown, if skipped
    extra = [Grid(dp=n, zero=2)] + [Grid(tp=t, dp=max(1, n // t), show_dp=True) for t in (2, 4)] \
        + [Grid(pp=2, dp=max(1, n // 2), show_dp=True)]
    return dp + [g for g in extra if g.world > 1]


def default_resume(n: int) -> str:
    return "tp2-pp2-dp2:tp2-dp4" if n >= 8 else "tp2-pp2:tp2-dp2" if n >= 4 else "pp2:tp2" if n >= 2 else "none"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.dtype = "bf16" if args.device == "cuda" and not args.fp32 else "fp32"
        self.out, self.work = Path(args.out), Path(args.work_dir)
        self.grid_filter = set(args.grids.split(",")) if args.grids else None
        self.ref = json.loads(Path(args.reference).read_text()) if args.reference else None
        self.res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "device": device_name(args.device), "gpus": args.gpus, "dtype": self.dtype,
                    "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
                    "correctness": [], "resume": [], "scaling": [], "skipped": [], "tolerance": {}, "runs": {}}
        if self.ref:
            self.res["reference"] = f"1-GPU runs reused from {args.reference} ({self.ref['date']}, " \
                                    f"{self.ref['device']})"
        self.failed = False
        self.perturb = shlex.split(args.perturb)  # trainer flags for the runs under test, not the references

    # ---- configs and runs -------------------------------------------------------------------
    def config(self, flavour: str) -> str:
        return str(REPO / "examples" / "configs" / f"{'debug' if self.a.tiny else flavour}.yaml")

    def batch(self, section: str, flavour: str, g: Grid) -> tuple[int, int]:
        """(micro-batch, accumulation). Correctness: 8 sequences a step on every grid. Scaling: the
        flavour's micro-batch per rank (weak scaling); pipelines get 4·pp micro-batches a step."""
        if section == "correctness":
            return MICRO, ACCUM // g.dp
        t = load_config(self.config(flavour), []).train
        return t.micro_batch_size, max(t.grad_accum, 4 * g.pp) if g.pp > 1 else t.grad_accum

    def flags(self, section: str, flavour: str, g: Grid, extra: list[str] = (), micro_accum=None) -> list[str]:
        micro, accum = micro_accum or self.batch(section, flavour, g)
        f = ["--config", self.config(flavour), "--data.synthetic", "true", "--train.steps", str(self.a.steps),
             "--train.log_interval", "1", "--train.eval_interval", "0", "--train.eval_steps", "1",
             "--train.progress", "off", "--logging.tensorboard", "false", "--checkpoint.interval", "0",
             "--train.device", self.a.device, "--parallel.tp", str(g.tp), "--parallel.pp", str(g.pp),
             "--parallel.dp", str(g.dp), "--train.micro_batch_size", str(micro), "--train.grad_accum", str(accum)]
        f += ["--optim.zero_stage", str(g.zero)] if g.zero else []
        if section == "correctness":
            f += ["--optim.warmup_steps", str(max(1, self.a.steps // 4))]  # reach the peak LR inside the window
            f += ["--train.dtype", self.dtype]
        else:
            f += ["--checkpoint.save_at_end", "false"]  # 1b: ~18 GB a run that nobody reads
            if self.a.device == "cuda" and not self.a.no_compile:
                f += ["--train.compile", "true"]  # as the throughput issue's 1-GPU number
        return f + (TINY if self.a.tiny else []) + list(extra)

    def runnable(self, section: str, flavour: str, g: Grid, flags: list[str], reason: str | None = None) -> bool:
        """Whether ``g`` fits the GPUs and the model; if not, the reason goes to the results."""
        reason = reason or self.why_skip(g, flags)
        if reason:
            print(f"[skip] {section} {flavour} {g.name}: {reason}", flush=True)
            self.res["skipped"].append({"section": section, "flavour": flavour, "grid": g.name, "reason": reason})
        return reason is None

    def why_skip(self, g: Grid, flags: list[str]) -> str | None:
        if g.world > self.a.gpus:
            return f"needs {g.world} GPUs, --gpus is {self.a.gpus}"
        try:
            validate(load_config(flags[1], flags[2:]), g.world)
        except ConfigError as e:
            return str(e)
        return None

    def wanted(self, g: Grid, always: bool = False) -> bool:
        return always or self.grid_filter is None or g.name in self.grid_filter

    def launch(self, key: str, flags: list[str], world: int, run_dir: Path | None = None) -> dict:
        """Run the trainer CLI and parse its metrics. ``run_dir``: prepared by the caller (a checkpoint
        to resume); otherwise a fresh one, since the trainer would resume from, and append to,
        whatever an earlier call left there. With --reference, a 1-GPU run is taken from there."""
        if self.ref and key.endswith(("/1gpu", "/1gpu-mb8", "/dp1-z1")) and key in self.ref["runs"]:
            print(f"[reuse] {key} from {self.a.reference}", flush=True)
            run = {k: ({int(s): v for s, v in d.items()} if isinstance(d, dict) else d)
                   for k, d in self.ref["runs"][key].items()}  # JSON made the step keys strings
            self.res["runs"][key] = run
            return run
        if run_dir is None:
            run_dir = self.work / key
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
        cmd = [sys.executable, *launcher, "-m", "megamod.train", *flags, "--train.run_dir", str(run_dir)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT") and not k.startswith(("SLURM_", "OMPI_"))}
        env.update(PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]),
                   DS_ACCELERATOR=self.a.device, PYTHONUNBUFFERED="1")
        if self.a.device == "cpu":
            env["OMP_NUM_THREADS"] = "1"  # N ranks on a few cores: no thread oversubscription
        print(f"[run] {key} ({world} rank{'s' * (world > 1)})", flush=True)
        t0, log = time.time(), run_dir / "log.txt"
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=self.a.run_timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        text = log.read_text(errors="replace")
        run = {"rc": rc, "wall_s": round(time.time() - t0, 1), "log": str(log), "resumed": "resumed from" in text,
               **read_metrics(run_dir / "metrics.jsonl")}
        if rc != 0:
            print(f"[fail] {key}: exit {rc}; the end of {log}:\n" + "\n".join(text.splitlines()[-25:]), flush=True)
        self.res["runs"][key] = run
        return run

    # ---- correctness --------------------------------------------------------------------------
    def correctness(self, flavour: str) -> None:
        S, one = self.a.steps, Grid()
        k = S // 2
        ref = self.launch(f"correctness/{flavour}/1gpu", self.flags("correctness", flavour, one), 1)
        ctl = self.launch(f"correctness/{flavour}/1gpu-mb8",
                          self.flags("correctness", flavour, one, micro_accum=(MICRO * ACCUM, 1)), 1)
        if ref["rc"] != 0 or ctl["rc"] != 0 or len(ref["loss"]) < S or len(ctl["loss"]) < S:
            self.failed = True
            self.res["correctness"].append({"flavour": flavour, "grid": "1gpu", "pass": False,
                                            "note": "the reference or control run failed"})
            return self.write()
        c = compare(ref, ctl, range(1, S + 1))
        f1, fm = FLOORS[self.dtype]
        tol = {"step1": max(f1, 3 * c["step1_loss"], 3 * c["step1_grad_norm"]), "mean": max(fm, 3 * c["mean"]),
               "max": max(3 * fm, 3 * c["max"])}
        self.res["tolerance"][flavour] = tol
        self.res["correctness"].append({"flavour": flavour, "grid": "1gpu-mb8 (control)", "ranks": 1,
                                        "batch": f"{MICRO * ACCUM}×1", **c, "pass": None})
        save_name, _, at_name = self.a.resume.partition(":")
        for g in correctness_grids(self.a.gpus):
            is_save = g.name == save_name  # its run also checkpoints at step k for the resume check
            if not self.wanted(g, always=is_save):
                continue
            flags = self.flags("correctness", flavour, g, self.perturb + (["--checkpoint.interval", str(k)] * is_save))
            if not self.runnable("correctness", flavour, g, flags):
                continue
            run = self.launch(f"correctness/{flavour}/{g.name}", flags, g.world)
            self.record("correctness", flavour, g, ref, run, range(1, S + 1), tol)
        if self.a.resume != "none":
            self.resume(flavour, Grid.parse(save_name), Grid.parse(at_name), ref, tol, k)
        self.write()

    def resume(self, flavour: str, save: Grid, at: Grid, ref: dict, tol: dict, k: int) -> None:
        src = self.work / f"correctness/{flavour}/{save.name}/checkpoints/step_{k:08d}"
        flags = self.flags("correctness", flavour, at, self.perturb)
        missing = None if (src / "megamod_complete.json").exists() else f"no checkpoint {src} (did {save.name} run?)"
        if not self.runnable("resume", flavour, at, flags, reason=missing):
            return
        key = f"resume/{flavour}/{save.name}_to_{at.name}"
        shutil.rmtree(self.work / key, ignore_errors=True)
        shutil.copytree(src, self.work / key / "checkpoints" / src.name)  # a run dir holding step k alone
        run = self.launch(key, flags, at.world, run_dir=self.work / key)
        row = self.record("resume", flavour, at, ref, run, range(k + 1, self.a.steps + 1), tol,
                          saved_at=save.name, step=k)
        if not run["resumed"]:
            row.update({"pass": False, "note": "the run did not resume from the checkpoint"})
            self.failed = True

    def record(self, section: str, flavour: str, g: Grid, ref: dict, run: dict, steps: range, tol: dict,
               **extra) -> dict:
        micro, accum = self.batch(section if section != "resume" else "correctness", flavour, g)
        row = {"flavour": flavour, "grid": g.name, "ranks": g.world, "batch": f"{micro}×{accum}",
               "wall_s": run["wall_s"], **extra}
        if run["rc"] != 0 or any(s not in run["loss"] for s in steps):
            row.update({"pass": False, "note": f"run failed (exit {run['rc']}), see {run['log']}"})
        else:
            c = compare(ref, run, steps)
            ok = c["mean"] <= tol["mean"] and c["max"] <= tol["max"]
            if steps.start == 1:  # step-1 checks only for runs that start from the init
                ok = ok and c["step1_loss"] <= tol["step1"] and c["step1_grad_norm"] <= tol["step1"]
            row.update(c, **{"pass": ok})
        self.failed |= not row["pass"]
        print(f"[{'pass' if row['pass'] else 'FAIL'}] {section} {flavour} {g.name}: "
              + " ".join(f"{k} {v:.2e}" for k, v in row.items() if isinstance(v, float) and k != "wall_s"), flush=True)
        self.res[section].append(row)
        self.write()
        return row

    # ---- scaling ------------------------------------------------------------------------------
    def scaling(self, flavour: str) -> None:
        S, warm = self.a.steps, max(1, self.a.steps // 4)
        zero = load_config(self.config(flavour), []).optim.zero_stage
        baseline = None
        for g in scaling_grids(self.a.gpus):
            if not self.wanted(g, always=g.world == 1):
                continue
            flags = self.flags("scaling", flavour, g)
            if not self.runnable("scaling", flavour, g, flags):
                continue
            run = self.launch(f"scaling/{flavour}/{g.name}", flags, g.world)
            micro, accum = self.batch("scaling", flavour, g)
            tps = [v for s, v in sorted(run["tokens_per_s"].items()) if s > warm]
            mfu = [v for s, v in sorted(run["mfu"].items()) if s > warm]
            row = {"flavour": flavour, "grid": g.name, "zero": g.zero or zero, "ranks": g.world,
                   "batch": f"{micro}×{accum}", "seqs_per_gpu_step": micro * accum * g.dp / g.world,
                   "ok": run["rc"] == 0 and len(run["tokens_per_s"]) == S, "wall_s": run["wall_s"]}
            if row["ok"]:
                row.update(tokens_per_s_per_gpu=statistics.median(tps) / g.world,
                           mfu=statistics.median(mfu) if mfu else None, peak_gib=run["peak_gib"])
                if g.world == 1 and g.zero == 1:
                    baseline = row["tokens_per_s_per_gpu"]
                if baseline:
                    row["efficiency"] = row["tokens_per_s_per_gpu"] / baseline
            print(f"[scaling] {flavour} {g.name}: " + json.dumps({k: v for k, v in row.items() if k != "flavour"}),
                  flush=True)
            self.res["scaling"].append(row)
            self.write()

    # ---- plan and output --------------------------------------------------------------------
    def plan(self) -> None:
        from megamod.train.dryrun import GIB, memory_per_rank

        print(f"plan for {self.a.gpus} GPUs, device {self.a.device} ({self.dtype}), {self.a.steps} steps per run; "
              f"memory: megamod-train --dry-run's bound per rank (activations without flash attention's savings)")
        for section, grids in (("correctness", correctness_grids), ("scaling", scaling_grids)):
            for flavour in getattr(self.a, f"{section}_flavours").split(",") if section in self.a.which else []:
                print(f"\n{section} {flavour}:\n  {'grid':<14} ranks  micro×accum  GiB/rank  status")
                for g in ([Grid()] if section == "correctness" else []) + grids(self.a.gpus):
                    if not self.wanted(g, always=g.world == 1):
                        continue
                    flags = self.flags(section, flavour, g)
                    reason, mem = self.why_skip(g, flags), "-"
                    if reason is None or reason.startswith("needs"):
                        mem = f"{memory_per_rank(load_config(flags[1], flags[2:]), g.world)['total'] / GIB:.2f}"
                    micro, accum = self.batch(section, flavour, g)
                    name = g.name if g.world > 1 or section == "scaling" else "1gpu"
                    print(f"  {name:<14} {g.world:>5}  {f'{micro}×{accum}':<11}  {mem:>8}  "
                          f"{'run' if reason is None else 'skip: ' + reason}")
        if "correctness" in self.a.which:
            print(f"\nresume across grids (SAVE:AT): {self.a.resume}, from the checkpoint at step {self.a.steps // 2}")

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "multi_gpu.json").write_text(json.dumps(self.res, indent=1))
        (self.out / "multi_gpu.md").write_text(markdown(self.res))


def read_metrics(path: Path) -> dict:
    out = {"loss": {}, "grad_norm": {}, "tokens_per_s": {}, "mfu": {}}
    peak = []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "train":
                for k in out:
                    if k in rec:
                        out[k][rec["step"]] = rec[k]
                peak.append(rec.get("peak_mem_gib", rec.get("peak_rss_gib", 0.0)))
    return {**out, "peak_gib": max(peak, default=None)}


def compare(ref: dict, run: dict, steps: range) -> dict:
    """Relative loss differences over ``steps``; from step 1 also step 1's loss and grad norm."""
    def rel(key: str, s: int) -> float:
        return abs(run[key][s] - ref[key][s]) / max(abs(ref[key][s]), 1e-12)

    d = [rel("loss", s) for s in steps]
    out = {"mean": sum(d) / len(d), "max": max(d)}
    return {**out, "step1_loss": d[0], "step1_grad_norm": rel("grad_norm", 1)} if steps.start == 1 else out


def gpu_names() -> list[str]:
    """From nvidia-smi, so that the driver itself never creates a CUDA context."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [n.strip() for n in out.splitlines() if n.strip()]


def device_name(device: str) -> str:
    names = gpu_names() if device == "cuda" else []
    if device == "cpu":
        return f"CPU ranks over gloo, {os.cpu_count()} cores"
    return f"{len(names)} × {names[0]}" if names else "cuda (nvidia-smi lists no GPU)"


def markdown(r: dict) -> str:
    def f(v, fmt=".2e"):
        return "–" if v is None else format(v, fmt) if isinstance(v, float) else str(v)

    verdict = {True: "pass", False: "**FAIL**", None: "(control)"}
    lines = ["# Multi-GPU correctness and scaling (benchmarks/multi_gpu.py)", "",
             f"- date: {r['date']}", f"- device: {r['device']} (--gpus {r['gpus']}), {r['dtype']}",
             f"- command: `{r['command']}`"] + ([f"- {r['reference']}"] if r.get("reference") else []) + [""]
    if r["correctness"] or r["resume"]:
        lines += ["## Correctness: relative loss difference to the 1-GPU reference (micro 2 × accum 4)", "",
                  "Tolerance per flavour (3× the control's difference, floors in the script's docstring): "
                  + "; ".join(f"{fl}: step 1 {t['step1']:.1e}, mean {t['mean']:.1e}, max {t['max']:.1e}"
                              for fl, t in r["tolerance"].items()), "",
                  "| flavour | grid | ranks | micro×accum | step-1 loss | step-1 grad norm | mean | max | result |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in r["correctness"]:
            lines.append(f"| {x['flavour']} | {x['grid']} | {x.get('ranks', 1)} | {x.get('batch', '')} | "
                         f"{f(x.get('step1_loss'))} | {f(x.get('step1_grad_norm'))} | {f(x.get('mean'))} | "
                         f"{f(x.get('max'))} | {verdict[x['pass']]} {x.get('note', '')} |")
        for x in r["resume"]:
            lines.append(f"| {x['flavour']} | resume {x.get('saved_at')} → {x['grid']} at step {x.get('step')} | "
                         f"{x['ranks']} | {x['batch']} | – | – | {f(x.get('mean'))} | {f(x.get('max'))} | "
                         f"{verdict[x['pass']]} {x.get('note', '')} |")
        lines.append("")
    if r["scaling"]:
        lines += ["## Scaling: tokens/s per GPU (median after warm-up), weak-scaling efficiency vs 1 GPU ZeRO-1",
                  "", f"For reference, the throughput issue's 1-GPU number: {THROUGHPUT_ISSUE}.", "",
                  "| flavour | grid | ZeRO | ranks | micro×accum | seqs/GPU/step | tokens/s/GPU | MFU | peak GiB | "
                  "efficiency |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["scaling"]:
            lines.append(f"| {x['flavour']} | {x['grid']} | {x['zero']} | {x['ranks']} | {x['batch']} | "
                         f"{x['seqs_per_gpu_step']:g} | {f(x.get('tokens_per_s_per_gpu'), ',.0f')} | "
                         f"{f(x.get('mfu'), '.1%')} | {f(x.get('peak_gib'), '.1f')} | "
                         f"{f(x.get('efficiency'), '.1%') if x['ok'] else '**run failed**'} |")
        goal = [x for x in r["scaling"] if x["flavour"] == "1b" and x["grid"] == "dp8-z1" and x.get("efficiency")]
        lines += ["", "Target (1b, ZeRO-1, 8 GPUs ≥ 90%): " + (f"{goal[0]['efficiency']:.1%}, "
                  f"{'met' if goal[0]['efficiency'] >= 0.9 else 'NOT met'}" if goal else "not measured"), ""]
    if r["skipped"]:
        lines += ["## Skipped", ""] + [f"- {x['section']} {x['flavour']} {x['grid']}: {x['reason']}"
                                       for x in r["skipped"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    gpus = gpu_names()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\nEvery")[0], epilog="Method, tolerances and "
                                 "grids: the module docstring.", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=None, help="ranks on this node (default: GPUs seen, else 4)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if gpus else "cpu")
    ap.add_argument("--which", default="correctness,scaling", help="comma list: correctness, scaling")
    ap.add_argument("--correctness-flavours", default=None, help="default debug,350m (--tiny: tiny)")
    ap.add_argument("--scaling-flavours", default=None, help="default 1b,2b (--tiny: tiny)")
    ap.add_argument("--grids", default="", help="only these grids (names as printed by --plan); 1-GPU "
                    "references always run")
    ap.add_argument("--resume", default=None, help="SAVE:AT grids for the cross-grid resume, or none "
                    "(default by --gpus: tp2-pp2-dp2:tp2-dp4 at 8)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 20; --tiny 8)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU tests); flavour names become labels")
    ap.add_argument("--fp32", action="store_true", help="correctness runs in fp32 on GPU too (see the docstring)")
    ap.add_argument("--no-compile", action="store_true", help="scaling runs without torch.compile")
    ap.add_argument("--reference", default="", help="a previous multi_gpu.json whose runs of the same name "
                    "(the 1-GPU references) are reused instead of rerun")
    ap.add_argument("--perturb", default="", help="trainer flags added to the correctness runs under test but not "
                    "to the 1-GPU references, to see a check fail: --perturb='--optim.lr 0.006'")
    ap.add_argument("--plan", action="store_true", help="print grids, skips and per-rank memory; run nothing")
    ap.add_argument("--out", default=os.environ.get("OUT") or "multi_gpu_out", help="multi_gpu.md/.json go here")
    ap.add_argument("--work-dir", default="/tmp/megamod_multi_gpu", help="run directories (checkpoints, logs)")
    ap.add_argument("--run-timeout", type=int, default=1800, help="seconds per trainer run")
    a = ap.parse_args(argv)
    a.gpus = a.gpus or (len(gpus) if a.device == "cuda" and gpus else 4)
    a.steps = a.steps or (8 if a.tiny else 20)
    a.correctness_flavours = a.correctness_flavours or ("tiny" if a.tiny else "debug,350m")
    a.scaling_flavours = a.scaling_flavours or ("tiny" if a.tiny else "1b,2b")
    a.resume = a.resume or default_resume(a.gpus)
    a.which = a.which.split(",")
    bench = Bench(a)
    if a.plan:
        bench.plan()
        return 0
    for flavour in a.correctness_flavours.split(",") if "correctness" in a.which else []:
        bench.correctness(flavour)
    for flavour in a.scaling_flavours.split(",") if "scaling" in a.which else []:
        bench.scaling(flavour)
    bench.write()
    print(f"\nresults: {bench.out / 'multi_gpu.md'}\n\n{markdown(bench.res)}")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
