"""Multi-GPU correctness, scaling and long-context CP of the real trainer CLI (issues #10, #27). One call per node:

    python benchmarks/multi_gpu.py --gpus 8 --plan                 # every grid, skips and memory per rank; runs nothing
    python benchmarks/multi_gpu.py --gpus 8                        # correctness + scaling, results in $OUT or --out
    python benchmarks/multi_gpu.py --gpus 8 --which scaling --scaling-flavours 1b --grids dp2-z1,dp8-z1
    python benchmarks/multi_gpu.py --gpus 8 --which long,mod,search   # CP MoBA at 1M over cp 8 (multi_gpu_long.py)
    python benchmarks/multi_gpu.py --gpus 4 --which tp-profile     # tp2/tp4 of 1b with NCCL kernel time per step
    python benchmarks/multi_gpu.py --tiny --device cpu --gpus 4    # CPU/gloo smoke test (tests/integration)

Every run is ``python -m torch.distributed.run --standalone --nproc_per_node N -m megamod.train
--config examples/configs/<flavour>.yaml ...`` on synthetic data (plain ``python -m megamod.train``
for one rank; benchmarks/train_probe.py in its place where a run is profiled or skips CP's
transfers); losses, grad norms and tokens/s come from the run's ``metrics.jsonl`` (log interval 1).
The driver never imports CUDA, so the GPUs stay free for the ranks. NVLink multicast stays off in
every run (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).

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

Context parallelism (--variants): ``dense`` is the flavour as it is, on the grids above and cp2,
cp4, cp8; ``moba`` is the flavour with MoBA (block S/16, top-3, the last layer dense: 16 blocks a
sequence, so at cp 8 every zigzag chunk is one block and a query's two picked blocks mostly live
on other ranks) on cp2, cp4, cp8, with its own reference, control and resume (--resume-moba,
default at 8 GPUs cp8:cp4-dp2). The same bounds hold them (bf16: 1e-2 at step 1, 2e-2 mean, 6e-2
max, or 3× the control's where larger): CP changes summation order at the same places TP does
(attention is cut into pieces merged by log-sum-exp in fp32; the gathered keys' bf16 gradients
are reduce-scattered, summed over cp ranks, as TP all-reduces bf16 partial sums), while a wrong
chunk order, a lost piece or a double-counted loss moves step 1 by far more than 1e-2.

Scaling (``1b`` and ``2b``, each flavour's YAML: micro-batch, ZeRO stage, no recompute; blocks
compiled on GPU as in the throughput issue): tokens/s per GPU = the median over steps after the
first steps/4 of the run's tokens_per_s (global tokens per step / step time) divided by its ranks.
Weak scaling: the micro-batch per rank is fixed and the global batch grows with dp. dp only at
1, 2, 4, ... GPUs under ZeRO-1 and at 2, 4, ... under ZeRO-2 (dp 1 partitions nothing, so the
ZeRO-1 run is both stages' reference); tp=2 and tp=4 and pp=2 fill the node
with dp (pp runs 4·pp micro-batches a step, bubble (pp-1)/(4pp+pp-1)). Efficiency = tokens/s per
GPU ÷ the 1-GPU ZeRO-1 run's on the same machine in the same call (or --reference's). The issue's
target: 1b, ZeRO-1, 8 GPUs >= 0.90. Scaling runs save no checkpoint (1b: ~18 GB a run).

TP's collectives (--which tp-profile, optional): the tp2 and tp4 scaling grids of --scaling-flavours
again under torch.profiler (train_probe.py --profile-steps) over --tp-profile-steps: NCCL kernel time
per step, the part of it when no other kernel runs (exposed), per kind, per layer (per step /
layers); step time and tokens/s come from the unprofiled steps.

Long sequences (--which long,mod,search): CP MoBA on the 1b flavour at --long-seq (1M) over
--long-cp (8) ranks, MoD under CP, the longest sequence that trains; method in multi_gpu_long.py.

Grids that do not fit --gpus or the model (heads, layers) are skipped with the reason. Results
(table + JSON) are rewritten after every run, so a call cut off by a time limit keeps what ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from megamod.config import ConfigError, load_config, validate  # noqa: E402
from multi_gpu_correctness import Correctness  # noqa: E402
from multi_gpu_grids import (MICRO, ACCUM, TINY, Grid, correctness_grids, default_resume, profile_grids,  # noqa: E402
                             scaling_grids)
from multi_gpu_long import LongContext  # noqa: E402
from multi_gpu_report import device_name, gpu_query, markdown, read_metrics  # noqa: E402
from multi_gpu_scaling import Scaling  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PROBE = str(REPO / "benchmarks" / "train_probe.py")


class Bench(Correctness, Scaling):
    """One call's runs and results; the sections live in the mixins and in LongContext."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.dtype = "bf16" if args.device == "cuda" and not args.fp32 else "fp32"
        self.out, self.work = Path(args.out), Path(args.work_dir)
        self.grid_filter = set(args.grids.split(",")) if args.grids else None
        self.ref = json.loads(Path(args.reference).read_text()) if args.reference else None
        self.res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "device": device_name(args.device), "gpus": args.gpus, "dtype": self.dtype,
                    "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
                    "correctness": [], "resume": [], "scaling": [], "tp_profile": [], "long": [], "mod": [],
                    "search": [], "skipped": [], "tolerance": {}, "runs": {}}
        if self.ref:
            self.res["reference"] = f"1-GPU runs reused from {args.reference} ({self.ref['date']}, " \
                                    f"{self.ref['device']})"
        self.failed = False
        self.perturb = shlex.split(args.perturb)  # trainer flags for the runs under test, not the references
        self.long = LongContext(self)

    # ---- configs and runs -------------------------------------------------------------------
    def config(self, flavour: str) -> str:
        return str(REPO / "examples" / "configs" / f"{'debug' if self.a.tiny else flavour}.yaml")

    def variant_flags(self, flavour: str, variant: str) -> list[str]:
        """The moba variant: blocks of S/16 (whole blocks per zigzag chunk up to cp 8), top 3, last layer dense."""
        if variant == "dense":
            return []
        seq = 32 if self.a.tiny else load_config(self.config(flavour), []).train.seq_len
        return ["--model.attention", "moba", "--moba.chunk_size", str(seq // 16), "--moba.topk", "3",
                "--moba.full_attention_layers", "-1"]

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
             "--train.device", self.a.device, "--parallel.tp", str(g.tp), "--parallel.cp", str(g.cp),
             "--parallel.pp", str(g.pp), "--parallel.dp", str(g.dp), "--train.micro_batch_size", str(micro),
             "--train.grad_accum", str(accum)]
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

    def launch(self, key: str, flags: list[str], world: int, run_dir: Path | None = None,
               probe: list[str] | None = None) -> dict:
        """Run the trainer CLI (through train_probe.py with ``probe``'s switches) and parse its
        metrics. ``run_dir``: prepared by the caller (a checkpoint to resume); otherwise a fresh one,
        since the trainer would resume from, and append to, whatever an earlier call left there.
        With --reference, a 1-GPU run is taken from there."""
        if self.ref and world == 1 and key in self.ref["runs"]:
            print(f"[reuse] {key} from {self.a.reference}", flush=True)
            run = {k: ({int(s): v for s, v in d.items()} if isinstance(d, dict) and k != "last" else d)
                   for k, d in self.ref["runs"][key].items()}  # JSON made the step keys strings
            self.res["runs"][key] = run
            return run
        if run_dir is None:
            run_dir = self.work / key
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
        if probe is not None and "--profile-steps" in probe:
            probe = probe + ["--profile-out", str(run_dir / "profile")]
        entry = ["-m", "megamod.train"] if probe is None else [PROBE, *probe, "--"]
        cmd = [sys.executable, *launcher, *entry, *flags, "--train.run_dir", str(run_dir)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT") and not k.startswith(("SLURM_", "OMPI_"))}
        env.update(PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]),
                   DS_ACCELERATOR=self.a.device, PYTHONUNBUFFERED="1", **NO_MULTICAST)
        if self.a.device == "cpu":
            env["OMP_NUM_THREADS"] = "1"  # N ranks on a few cores: no thread oversubscription
        print(f"[run] {key} ({world} rank{'s' * (world > 1)})", flush=True)
        t0, log = time.time(), run_dir / "log.txt"
        with open(log, "w") as f:
            # its own process group: at the time limit torchrun's ranks go too, not only torchrun,
            # so no rank is left holding a GPU for the next run
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=self.a.run_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
        text = log.read_text(errors="replace")
        run = {"rc": rc, "wall_s": round(time.time() - t0, 1), "log": str(log), "resumed": "resumed from" in text,
               **read_metrics(run_dir / "metrics.jsonl")}
        profiles = sorted((run_dir / "profile").glob("rank*.json"))
        if profiles:
            run["profile"] = [json.loads(p.read_text()) for p in profiles]
        if rc != 0:
            print(f"[fail] {key}: exit {rc}; the end of {log}:\n" + "\n".join(text.splitlines()[-25:]), flush=True)
        self.res["runs"][key] = run
        return run

    # ---- plan and output --------------------------------------------------------------------
    def plan(self) -> None:
        from megamod.train.dryrun import GIB, memory_per_rank

        print(f"plan for {self.a.gpus} GPUs, device {self.a.device} ({self.dtype}), {self.a.steps} steps per run; "
              f"memory: megamod-train --dry-run's bound per rank (activations without flash attention's savings)")
        sections = [("correctness", v, f) for f in self.a.correctness_flavours for v in self.a.variants] \
            + [("scaling", "dense", f) for f in self.a.scaling_flavours] \
            + [("tp-profile", "dense", f) for f in self.a.scaling_flavours]
        grids = {"correctness": correctness_grids, "scaling": scaling_grids, "tp-profile": profile_grids}
        for section, variant, flavour in sections:
            if section not in self.a.which:
                continue
            label = flavour if variant == "dense" else f"{flavour}+{variant}"
            print(f"\n{section} {label}:\n  {'grid':<14} ranks  micro×accum  GiB/rank  status")
            for g in ([Grid()] if section == "correctness" else []) + grids[section](self.a.gpus, *(
                    [variant] if section == "correctness" else [])):
                if not self.wanted(g, always=g.world == 1):
                    continue
                flags = self.flags("scaling" if section == "tp-profile" else section, flavour, g,
                                   self.variant_flags(flavour, variant) if section == "correctness" else [])
                reason, mem = self.why_skip(g, flags), "-"
                if reason is None or reason.startswith("needs"):
                    mem = f"{memory_per_rank(load_config(flags[1], flags[2:]), g.world)['total'] / GIB:.2f}"
                micro, accum = self.batch("scaling" if section == "tp-profile" else section, flavour, g)
                name = g.name if g.world > 1 or section != "correctness" else "1gpu"
                print(f"  {name:<14} {g.world:>5}  {f'{micro}×{accum}':<11}  {mem:>8}  "
                      f"{'run' if reason is None else 'skip: ' + reason}")
            if section == "correctness":
                print(f"  resume across grids (SAVE:AT): {self.a.resume if variant == 'dense' else self.a.resume_moba}"
                      f", from the checkpoint at step {self.a.steps // 2}")
        self.long.plan(self.a.which)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "multi_gpu.json").write_text(json.dumps(self.res, indent=1))
        (self.out / "multi_gpu.md").write_text(markdown(self.res))


def main(argv: list[str] | None = None) -> int:
    gpus = gpu_query("name")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\nEvery")[0], epilog="Method, tolerances and "
                                 "grids: the module docstring.", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=None, help="ranks on this node (default: GPUs seen, else 4)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if gpus else "cpu")
    ap.add_argument("--which", default="correctness,scaling",
                    help="comma list: correctness, scaling, tp-profile, long, mod, search")
    ap.add_argument("--correctness-flavours", default=None, help="default debug,350m (--tiny: tiny)")
    ap.add_argument("--variants", default="dense,moba", help="correctness variants: dense, moba (docstring)")
    ap.add_argument("--scaling-flavours", default=None, help="default 1b,2b (--tiny: tiny); tp-profile's too")
    ap.add_argument("--grids", default="", help="only these grids (names as printed by --plan); 1-GPU "
                    "references always run")
    ap.add_argument("--resume", default=None, help="SAVE:AT grids for the dense cross-grid resume, or none "
                    "(default by --gpus: tp2-pp2-dp2:tp2-dp4 at 8)")
    ap.add_argument("--resume-moba", default=None, help="the same for the moba variant (default at 8: cp8:cp4-dp2)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 20; --tiny 8)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU tests); flavour names become labels")
    ap.add_argument("--fp32", action="store_true", help="correctness runs in fp32 on GPU too (see the docstring)")
    ap.add_argument("--no-compile", action="store_true", help="scaling runs without torch.compile")
    ap.add_argument("--tp-profile-steps", default=None, help="A:B, the steps tp-profile profiles (default: the "
                    "last quarter of --steps)")
    ap.add_argument("--long-seq", type=int, default=None, help="long/mod: S (default 1048576; --tiny 256)")
    ap.add_argument("--long-cp", type=int, default=8, help="long/mod/search: CP ranks (default 8)")
    ap.add_argument("--long-variants", default="hybrid,moba", help="long: hybrid (the recipe), moba (every layer "
                    "MoBA); the first also runs with CP's transfers skipped")
    ap.add_argument("--long-steps", type=int, default=None, help="steps per long/mod run (default 4; --tiny 3)")
    ap.add_argument("--long-profile", action="store_true", help="profile the last step of each cp long run too")
    ap.add_argument("--search-lengths", default=None, help="search: S values (default 1M,2M,2.5M,3M,4M; --tiny "
                    "256,512,1024)")
    ap.add_argument("--search-steps", type=int, default=2, help="steps per search run (the first warms up)")
    ap.add_argument("--mem-limit-gib", type=float, default=None, help="search: the dry-run bound a length may "
                    "have (default 95%% of the GPU's memory)")
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
    a.correctness_flavours = (a.correctness_flavours or ("tiny" if a.tiny else "debug,350m")).split(",")
    a.scaling_flavours = (a.scaling_flavours or ("tiny" if a.tiny else "1b,2b")).split(",")
    a.variants, a.long_variants = a.variants.split(","), a.long_variants.split(",")
    a.resume = a.resume or default_resume(a.gpus)
    a.resume_moba = a.resume_moba or default_resume(a.gpus, "moba")
    a.tp_profile_steps = a.tp_profile_steps or f"{a.steps - max(1, a.steps // 4) + 1}:{a.steps}"
    a.long_seq = a.long_seq or (256 if a.tiny else 1 << 20)
    a.long_steps = a.long_steps or (3 if a.tiny else 4)
    a.search_lengths = [int(s) for s in (a.search_lengths or ("256,512,1024" if a.tiny else
                                                              "1048576,2097152,2621440,3145728,4194304")).split(",")]
    a.which = a.which.split(",")
    unknown = set(a.which) - {"correctness", "scaling", "tp-profile", "long", "mod", "search"}
    if unknown:
        ap.error(f"--which {','.join(sorted(unknown))}: choose from correctness, scaling, tp-profile, long, mod, search")
    bench = Bench(a)
    if a.plan:
        bench.plan()
        return 0
    for flavour in a.correctness_flavours if "correctness" in a.which else []:
        for variant in a.variants:
            bench.correctness(flavour, variant)
    for section, run in (("scaling", bench.scaling), ("tp-profile", bench.tp_profile)):
        for flavour in a.scaling_flavours if section in a.which else []:
            run(flavour)
    for section in ("long", "mod", "search"):
        if section in a.which:
            getattr(bench.long, section)()
    bench.write()
    print(f"\nresults: {bench.out / 'multi_gpu.md'}\n\n{markdown(bench.res)}")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
