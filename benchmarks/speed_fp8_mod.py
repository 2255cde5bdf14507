"""Issue 25 on one GPU: FP8 against bf16 training steps (1b, 2b), and Mixture-of-Depths against
dense with each change to the work around the blocks measured on its own. One call, ~5 minutes
on an H200:

    python benchmarks/speed_fp8_mod.py --json $OUT/speed_fp8_mod.json --profile $OUT/mod_profile.txt
    python benchmarks/speed_fp8_mod.py --tiny            # CPU smoke run of the script (no FP8 there)

Every variant is the real ``Trainer.train_step``: DeepSpeed ZeRO-0 with bf16 weights and
MasterAdamW (train.bf16_mode auto = master_fused on one GPU), compiled blocks and loss, synthetic
tokens, seq 2048, micro-batch 16 x accumulation 1 unless the row says otherwise (the same for
dense and MoD, as the issue asks). Variants run one after another in a child process per group
(1b bars d1 f1t m1 f1r, 2b bars d2 f2t m2 f2r, 1b changes), freed in between; each child prints
one JSON line a variant, so a run cut short keeps what it measured. Weights are drawn on the device (the trainer's per-name
CPU draws take seconds at 2B parameters and do not change a step's speed). Median of --steps
steps after --warmup, synchronised after each.

FP8 (train.fp8): tensorwise and rowwise scaling of the block linears against bf16, same config;
MFU against the bf16 peak for every row (989 TFLOP/s on H100/H200), and for FP8 rows also against
the FP8 peak (1979): both printed. The 2b rowwise row runs only if rowwise came within 5% of
tensorwise at 1b (the bar takes the better of the two); the skip is printed.

MoD (12.5%, every 2nd block) against dense: the speed-up per step over the analytic FLOPs ratio
(model/flops.py). The changes, each on its own against the bar row (m1 with d1):
  mb8x2    micro-batch 8 x accumulation 2 (the issue's 1.61x setting): what the batch shape alone does
  gemm     the router and predictor-output d -> 1 products as GEMMs again (before model/mod.py's
           project_to_one)
  fixed    routing replaced by fixed positions (mod_speed.py's ablation): the bound with routing free
  chunk    --train.loss_chunk_tokens 4096 (chunked output projection + cross-entropy) in both models
  fp8      MoD with FP8 tensorwise (the two changes together)
The optimizer step (MasterAdamW: norm + update) is timed alone on d1, m1, d2 and m2.

After the 1b rows, a correctness check on the GPU: one training step of a small MoD model (dense and
MoBA attention) in FP8 against bf16 from the same weights (fp8_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]


@dataclass(frozen=True)
class Variant:
    key: str
    flavour: str
    fp8: str = "off"
    mod: bool = False
    mb: int = 16
    accum: int = 1
    change: str = ""  # a model edit before the first step: "gemm" or "fixed"
    flags: tuple[str, ...] = ()
    optimizer_timing: bool = False
    label: str = ""


_1B = [Variant("d1", "1b", optimizer_timing=True, label="dense bf16"),
       Variant("f1t", "1b", fp8="tensorwise", label="dense FP8 tensorwise"),
       Variant("m1", "1b", mod=True, optimizer_timing=True, label="MoD bf16"),
       Variant("f1r", "1b", fp8="rowwise", label="dense FP8 rowwise")]
_2B = [Variant("d2", "2b", optimizer_timing=True, label="dense bf16"),
       Variant("f2t", "2b", fp8="tensorwise", label="dense FP8 tensorwise"),
       Variant("m2", "2b", mod=True, optimizer_timing=True, label="MoD bf16"),
       Variant("f2r", "2b", fp8="rowwise", label="dense FP8 rowwise")]
_CHANGES = [Variant("d1-mb8x2", "1b", mb=8, accum=2, label="dense bf16, micro-batch 8 x 2"),
            Variant("m1-mb8x2", "1b", mod=True, mb=8, accum=2, label="MoD bf16, micro-batch 8 x 2"),
            Variant("m1-gemm", "1b", mod=True, change="gemm", label="MoD, router as a GEMM"),
            Variant("m1-fixed", "1b", mod=True, change="fixed", label="MoD, fixed positions (no routing)"),
            Variant("d1-chunk", "1b", flags=("--train.loss_chunk_tokens", "4096"), label="dense, chunked loss"),
            Variant("m1-chunk", "1b", mod=True, flags=("--train.loss_chunk_tokens", "4096"),
                    label="MoD, chunked loss"),
            Variant("m1-fp8", "1b", mod=True, fp8="tensorwise", label="MoD FP8 tensorwise")]
GROUPS = {"1b": _1B, "2b": _2B, "changes": _CHANGES}
BARS = {"fp8_1b": 1.20, "fp8_2b": 1.30, "mod_1b": 0.95, "mod_2b": 0.96}


# ---- one variant, in the child process ----------------------------------------------------------
def _overrides(v: Variant, a) -> list[str]:
    out = ["--model.flavour", "debug" if a.tiny else v.flavour, "--train.seq_len", str(a.seq),
           "--model.max_seq_len", str(max(a.seq, 4096)), "--train.micro_batch_size", str(v.mb if not a.tiny else 2),
           "--train.grad_accum", str(v.accum), "--train.steps", "1000", "--optim.zero_stage", "0",
           "--train.compile", str(not a.tiny).lower(), "--train.fp8", v.fp8, "--data.synthetic", "true",
           "--checkpoint.resume", "false", "--checkpoint.save_at_end", "false", "--logging.tensorboard", "false",
           "--train.progress", "off", "--train.eval_interval", "0", "--train.run_dir", f"/tmp/megamod-25-{v.key}",
           "--train.device", "cpu" if a.tiny else "cuda", *v.flags]
    if v.mod:
        out += ["--mod.enabled", "true", "--mod.capacity", "0.125", "--mod.every", "2"]
    return out


def _router_as_gemm(model) -> None:
    """The routed blocks' scores with the d -> 1 products as nn.Linear calls (GEMMs)."""
    import torch
    import torch.nn.functional as F

    from megamod.model.mod import routed_blocks

    for block in routed_blocks(model).values():
        def scores(x, block=block):
            r = block.router(x)
            p = block.predictor
            return torch.cat([r, p.out(F.silu(p.hidden(x.detach())))], dim=-1).float()

        block.scores = scores  # before the first call: the compiled block traces this one


def _time_optimizer(trainer, batches, device, reps: int = 5) -> float:
    """ms of one optimizer step (gradient norm, clip, update) alone, on one micro-batch's gradients
    (MasterAdamW without accumulation reads the .grad tensors, which stay between the calls)."""
    import torch

    tokens, targets, positions = trainer._shard(next(batches))
    trainer.engine.backward(trainer.loss_fn(trainer.engine(tokens, positions), targets))
    opt = trainer.engine.optimizer
    opt.step()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            opt.step()
        return (time.perf_counter() - t0) / reps * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(reps):
        opt.step()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / reps


def run_variant(v: Variant, a, device) -> dict:
    import torch

    from megamod.config import load_config
    from megamod.model.flops import peak_flops, train_flops_per_step
    from megamod.parallel.dims import ParallelDims
    from megamod.train.data import micro_batches
    from megamod.train.trainer import Trainer
    from mod_speed import _fix_routing
    from train_throughput import _profile, time_steps

    cfg = load_config(None, _overrides(v, a))
    dims = ParallelDims(tp=1, cp=1, dp=1, pp=1, rank=0)
    dims.build_groups()
    t0 = time.perf_counter()
    trainer = Trainer.build(cfg, dims, device)
    {"gemm": _router_as_gemm, "fixed": _fix_routing, "": lambda m: None}[v.change](trainer.model)
    batches = micro_batches(trainer.train_data, cfg.train.micro_batch_size, 0, 1, 0)
    times = time_steps(lambda: trainer.train_step(batches), device, a.warmup, a.steps)
    step = statistics.median(times)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flops = train_flops_per_step(cfg, cfg.train.micro_batch_size * cfg.train.grad_accum)
    res = {"key": v.key, "label": v.label, "flavour": cfg.model.flavour, "fp8": v.fp8, "mod": v.mod,
           "micro_batch": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum, "device": name,
           "step_ms": step * 1e3, "p10_ms": sorted(times)[len(times) // 10] * 1e3,
           "p90_ms": sorted(times)[(9 * len(times)) // 10] * 1e3, "flops_per_step": flops,
           "tokens_per_s": cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len / step,
           "tflops": flops / step / 1e12}
    for key, dtype in (("mfu_bf16_peak", "bf16"), ("mfu_fp8_peak", "fp8")):
        peak = peak_flops(name, dtype)
        if peak and (dtype == "bf16" or v.fp8 != "off"):
            res[key] = flops / step / peak
    if v.optimizer_timing:
        res["optimizer_ms"] = _time_optimizer(trainer, batches, device)
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if a.profile and v.key == "m1-profile":
        _profile(lambda: trainer.train_step(batches), device, a.profile)
        if os.path.exists(a.profile + ".trace.json"):  # ~100 MB; its idle accounting is in the table
            os.remove(a.profile + ".trace.json")
    res["wall_s"] = time.perf_counter() - t0
    del trainer, batches
    return res


def _free(device) -> float:
    import torch

    gc.collect()
    torch._dynamo.reset()  # each model's guards go; the graphs stay in inductor's on-disk cache
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def child(a) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if a.tiny else "cuda")
    import torch
    import torch.distributed as dist

    import megamod.model.gpt as gpt

    torch._dynamo.config.cache_size_limit = 64
    # weights drawn on the device, not per name on the CPU (module docstring)
    gpt._normal_full_then_shard = lambda p, std, seed, name: p.normal_(0.0, std)
    device = torch.device("cpu") if a.tiny else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo" if a.tiny else "nccl", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    for v in GROUPS[a.group] + ([Variant("m1-profile", "1b", mod=True, label="MoD bf16, profiled")]
                                if a.group == "changes" and a.profile else []):
        if time.time() > a.deadline:
            print("RESULT " + json.dumps({"key": v.key, "skipped": "time budget spent"}), flush=True)
            continue
        if v.key == "f2r" and not a.rowwise_2b or (a.tiny and v.fp8 != "off"):
            print("RESULT " + json.dumps({"key": v.key, "skipped": "no FP8 on CPU" if a.tiny else
                                          "rowwise was > 5% slower than tensorwise at 1b"}), flush=True)
            continue
        try:
            res = run_variant(v, a, device)
        except Exception as e:  # one variant's failure (e.g. out of memory) must not lose the others
            res = {"key": v.key, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        res["left_allocated_gib"] = _free(device)
        print("RESULT " + json.dumps(res), flush=True)
    if a.check and not a.tiny:  # after the group's timings: its MoBA kernels compile first (~10-20 s)
        from fp8_check import fp8_check

        try:
            res = {"key": "fp8_check", **fp8_check(device)}
        except Exception as e:
            res = {"key": "fp8_check", "verdict": "FAIL", "error": f"{type(e).__name__}: {str(e)[:400]}"}
        print("RESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()


# ---- the parent: groups in children, then the report -------------------------------------------
def _run_group(group: str, a, results: dict, extra: list[str]) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), "--group", group, "--deadline", str(a.deadline),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--seq", str(a.seq), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    for line in proc.stdout:
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            results[r["key"]] = r
            print(json.dumps(r), flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(results, f, indent=1)
    err = proc.stderr.read()
    if proc.wait() != 0:
        print(f"group {group} exited {proc.returncode}:\n" + err[-4000:], file=sys.stderr)


def _ratio(results: dict, fast: str, slow: str) -> float | None:
    a, b = results.get(fast, {}), results.get(slow, {})
    return b["step_ms"] / a["step_ms"] if "step_ms" in a and "step_ms" in b else None


def report(results: dict) -> str:
    lines = ["| row | variant | micro-batch x accum | step ms (p10/p90) | tokens/s | TFLOP/s | MFU bf16 peak | "
             "MFU FP8 peak | optimizer ms | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        if "step_ms" not in r:
            lines.append(f"| {key} | {r.get('skipped') or r.get('error') or r.get('verdict', '')} |")
            continue
        f = lambda k, fmt: format(r[k], fmt) if k in r else "—"  # noqa: E731
        lines.append(f"| {key} | {r['flavour']} {r['label']} | {r['micro_batch']} x {r['grad_accum']} | "
                     f"{r['step_ms']:.1f} ({r['p10_ms']:.1f}/{r['p90_ms']:.1f}) | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops']:.1f} | {f('mfu_bf16_peak', '.1%')} | {f('mfu_fp8_peak', '.1%')} | "
                     f"{f('optimizer_ms', '.2f')} | {f('peak_mem_gib', '.1f')} |")
    out = ["", *lines, ""]

    def flops_ratio(d: str, m: str) -> float | None:
        rd, rm = results.get(d, {}), results.get(m, {})
        return rd["flops_per_step"] / rm["flops_per_step"] if "flops_per_step" in rd and "flops_per_step" in rm \
            else None

    for bar, pairs in (("fp8_1b", [("f1t", "d1"), ("f1r", "d1")]), ("fp8_2b", [("f2t", "d2"), ("f2r", "d2")])):
        got = {f: _ratio(results, f, d) for f, d in pairs}
        best = max((g for g in got.values() if g), default=None)
        parts = ", ".join(f"{f} {g:.3f}x" for f, g in got.items() if g)
        out.append(f"{bar}: FP8 vs bf16 per step: {parts or 'not measured'}; best "
                   + (f"{best:.3f}x, bar {BARS[bar]}x: {'MET' if best >= BARS[bar] else 'NOT met'}" if best else "—"))
    for bar, d, m in (("mod_1b", "d1", "m1"), ("mod_2b", "d2", "m2")):
        s, fr = _ratio(results, m, d), flops_ratio(d, m)
        out.append(f"{bar}: MoD speed-up {s:.3f}x / FLOPs ratio {fr:.3f}x = {s / fr:.3f}, bar {BARS[bar]}: "
                   f"{'MET' if s / fr >= BARS[bar] else 'NOT met'}" if s and fr else f"{bar}: not measured")
    out.append("MoD changes, each on its own (speed-up over dense / FLOPs ratio):")
    for m, d, what in (("m1", "d1", "bar row (mb 16 x 1)"), ("m1-mb8x2", "d1-mb8x2", "micro-batch 8 x 2"),
                       ("m1-gemm", "d1", "router as a GEMM"), ("m1-fixed", "d1", "fixed positions (routing free)"),
                       ("m1-chunk", "d1-chunk", "chunked loss in both"), ("m1-fp8", "f1t", "FP8 in both")):
        s, fr = _ratio(results, m, d), flops_ratio(d, m)
        out.append(f"  {what:<32} " + (f"{s:.3f}x / {fr:.3f}x = {s / fr:.3f}" if s and fr else "not measured"))
    for case, c in results.get("fp8_check", {}).get("cases", {}).items():
        out.append(f"fp8 check {case}: loss {c['loss']:.4f} (bf16 {c['loss_bf16']:.4f}), after the step "
                   f"{c['loss_after_step']:.4f} (bf16 {c['loss_after_step_bf16']:.4f}), block-weight gradient cosine "
                   f"{c['grad_cos']:.4f} together, {c['min_grad_cos']:.3f} at worst ({c['worst']}): "
                   f"{'pass' if c['pass'] else 'FAIL'}")
    for k in ("d1", "m1", "d2", "m2"):
        r = results.get(k, {})
        if "optimizer_ms" in r:
            out.append(f"optimizer step {k}: {r['optimizer_ms']:.2f} ms = {100 * r['optimizer_ms'] / r['step_ms']:.1f}%"
                       f" of the step")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: debug flavour, seq 64, no FP8, no compile")
    ap.add_argument("--steps", type=int, default=6, help="timed steps a variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--budget-s", type=float, default=285.0,
                    help="start no variant after this many seconds (the running one finishes)")
    ap.add_argument("--groups", default="1b,2b,changes")
    ap.add_argument("--json", help="results, rewritten after every variant")
    ap.add_argument("--profile", help="profile 3 steps of MoD 1b at the end of the changes group, tables here")
    ap.add_argument("--group", help=argparse.SUPPRESS)  # child
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rowwise-2b", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.tiny:
        a.seq, a.steps, a.warmup = 64, 2, 1
    if a.group:
        child(a)
        return 0
    a.deadline = time.time() + a.budget_s
    results: dict = {}
    common = (["--tiny"] if a.tiny else []) + (["--profile", a.profile] if a.profile else [])
    for i, group in enumerate(a.groups.split(",")):
        extra = list(common) + (["--check"] if i == 0 else [])
        if group == "2b":
            tw, rw = results.get("f1t", {}).get("step_ms"), results.get("f1r", {}).get("step_ms")
            if rw and (not tw or rw <= 1.05 * tw):
                extra.append("--rowwise-2b")
        _run_group(group, a, results, extra)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
