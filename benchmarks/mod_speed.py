"""Mixture-of-Depths training speed: dense vs MoD (12.5%, every 2nd block), side by side.

    python benchmarks/mod_speed.py                      # one H100: 1b flavour, bf16, seq 2048
    python benchmarks/mod_speed.py --tiny               # CPU smoke check (debug flavour, fp32)
    python benchmarks/mod_speed.py --check --json benchmarks/results/mod_speed.json

One training step = forward + backward + optimizer through the real Trainer (DeepSpeed engine,
ZeRO-1, bf16 with fp32 master weights, fused AdamW; or --zero-stage 0, the one-GPU autocast path),
synthetic tokens, one GPU. The two models
have the same architecture (MoD adds the router, d weights a routed block, and the predictor).
Each variant runs in its own child process, so the dense model's memory is gone before the MoD
model is built; the parent prints them side by side. Step times are medians over --steps steps
after --warmup steps, synchronised (the loss is read back) after every step.

Routing overhead: a routed block's forward + backward with its ``residual`` (attention + MLP)
replaced by the identity, i.e. router, predictor, top-k sort, gather, gate, scatter, aux losses and
statistics, times the number of routed blocks, as a fraction of the MoD step. Also timed alone:
scores (router + predictor), top-k, gather + scatter; and a full dense / routed block for context.

In-step routing cost (--ablate-routing, a third process): the same MoD model with each routed block's
routing replaced by fixed positions (the first k tokens of each sequence: no router, predictor,
top-k, gather, gate, aux losses or statistics; the block's output is one concatenation of the
updated and the untouched rows, the copy any out-of-place residual update makes). The MoD step
minus this one is what routing costs inside the step, where the dense blocks' GPU work hides
host time that the stand-alone timing above counts.

Targets (issue 6, one H100): MoD step >= 1.7x faster than dense; routing overhead < 5% of it.
For scale: the analytic FLOPs ratio of this pair (1b, seq 2048, full-square attention counted) is
1.72x, 1.71x with causal attention counted at half, so 1.7x asks for MoD's routed blocks to run
as efficiently as dense ones and for fixed costs (optimizer, embedding, loss) to be amortised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke check: debug flavour, fp32, seq 256")
    ap.add_argument("--flavour", default=None, help="model flavour (default 1b; debug with --tiny)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (256 with --tiny)")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default 4 (2 with --tiny)")
    ap.add_argument("--grad-accum", type=int, default=None,
                    help="micro-batches per optimizer step (default 4, so the optimizer's fixed cost is "
                         "amortised as in real training; 1 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 12; 3 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --tiny)")
    ap.add_argument("--capacity", type=float, default=0.125)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (both variants)")
    ap.add_argument("--zero-stage", type=int, default=1,
                    help="DeepSpeed ZeRO stage (1: bf16 master weights, the earlier runs; 0: the one-GPU "
                         "torch_autocast path of engine.py)")
    ap.add_argument("--check", action="store_true", help="exit 1 unless speedup >= 1.7 and overhead < 5%%")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--only-mod", action="store_true", help="run the MoD variant alone (profiling; no ratio)")
    ap.add_argument("--profile", help="profile 3 extra steps of each variant: tables to PROFILE.{dense,mod}.txt")
    ap.add_argument("--ablate-routing", action="store_true",
                    help="also time MoD with routing replaced by fixed positions (in-step routing cost)")
    ap.add_argument("--variant", choices=["dense", "mod", "mod-fixed"], help=argparse.SUPPRESS)  # child process
    a = ap.parse_args(argv)
    d = dict(flavour="debug", seq_len=256, micro_batch_size=2, grad_accum=1, steps=3, warmup=1) if a.tiny else \
        dict(flavour="1b", seq_len=2048, micro_batch_size=4, grad_accum=4, steps=12, warmup=3)
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def _overrides(a) -> list[str]:
    out = ["--model.flavour", a.flavour, "--train.seq_len", str(a.seq_len), "--model.max_seq_len",
           str(max(a.seq_len, 4096)), "--train.micro_batch_size", str(a.micro_batch_size),
           "--train.grad_accum", str(a.grad_accum),
           "--train.steps", str(a.steps + a.warmup), "--data.synthetic", "true", "--optim.zero_stage", str(a.zero_stage),
           "--train.run_dir", f"/tmp/megamod-mod-speed-{a.variant}-{os.getpid()}", "--checkpoint.resume", "false",
           "--logging.tensorboard", "false", "--train.progress", "off",
           "--train.device", "cpu" if a.tiny else "cuda", "--train.dtype", "fp32" if a.tiny else "bf16"]
    if a.compile:
        out += ["--train.compile", "true"]
    if a.variant in ("mod", "mod-fixed"):
        out += ["--mod.enabled", "true", "--mod.capacity", str(a.capacity), "--mod.every", str(a.every)]
    return out


def _timer(device):
    import torch

    def timed(fn, iters: int, warmup: int = 2) -> float:
        """Median seconds of fn() over iters calls, synchronised."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return timed


def _routing_parts(cfg, device, iters: int, compile: bool, profile: str | None = None) -> dict[str, float]:
    """Seconds per routed block (forward + backward) of the routing machinery and its pieces, on a
    freshly built block of the same shape (the engine's parameters are left alone), in the step's
    precision (engine.resolve_precision: bf16 weights and activations, or fp32 weights and
    residual stream under bf16 autocast) and compiled as the step's blocks are when ``compile``.
    ``profile``: also write the profiler's kernel table of the compiled routed block there."""
    import contextlib

    import torch

    from megamod.model.gpt import build_block
    from megamod.model.mod import capacity_tokens, routed_layers, topk_positions
    from megamod.model.rope import rope_tables
    from megamod.train.engine import resolve_precision

    precision = resolve_precision(cfg, device)
    dtype = torch.bfloat16 if precision in ("bf16", "master_fused") else torch.float32
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "autocast"
                else contextlib.nullcontext())
    timed = _timer(device)
    m = cfg.model
    b, s, d = cfg.train.micro_batch_size, cfg.train.seq_len, m.d_model
    k = capacity_tokens(cfg.mod.capacity, s)
    routed = build_block(cfg, routed_layers(cfg)[0]).to(device=device, dtype=dtype)
    dense = build_block(cfg, 0).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in [*routed.parameters(), *dense.parameters()]:
            p.normal_(0, 0.02) if p.ndim == 2 else p.fill_(1.0)
    routed.train()
    if compile:  # as apply_compile does to the step's blocks
        routed.compile(fullgraph=False)
        dense.compile(fullgraph=False)
    x = torch.randn(b, s, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(b, s, d, device=device, dtype=dtype)
    cos, sin = rope_tables(torch.arange(s, device=device), m.head_dim, m.rope_theta)

    def fwd_bwd(block):
        def run():
            with autocast:
                y = block(x, cos, sin)
            y.backward(grad)
            x.grad = None
            block.zero_grad(set_to_none=True)
        return run

    out = {"dense_block": timed(fwd_bwd(dense), iters), "routed_block": timed(fwd_bwd(routed), iters)}
    if profile:
        from train_throughput import _profile  # benchmarks/ is this script's directory

        _profile(fwd_bwd(routed), device, profile, iters=10)
    full_residual = routed.residual
    routed.residual = lambda xs, c, s_, kv=None: xs  # attention + MLP -> identity: routing only
    out["routing_overhead"] = timed(fwd_bwd(routed), iters)
    if profile:  # the routing alone (residual = identity), same table
        _profile(fwd_bwd(routed), device, profile.replace(".block.", ".routing."), iters=10)
    routed.residual = full_residual

    def scores():
        with autocast:
            sc = routed.scores(x)
        sc.sum().backward()
        x.grad = None

    logits = torch.randn(b, s, device=device)
    idx = topk_positions(logits, k)

    def take_put():
        with autocast:
            y = routed.put(x, idx, routed.take(x, idx))
        y.backward(grad)
        x.grad = None

    out["scores"] = timed(scores, iters)
    out["topk"] = timed(lambda: topk_positions(logits, k), iters)
    out["take_put"] = timed(take_put, iters)
    routed._stats.clear()
    return out


def _fix_routing(model) -> None:
    """Every routed block takes the first k tokens of each sequence, with no routing machinery
    (--ablate-routing; see the module docstring). The router and predictor then get no gradient."""
    import torch

    from megamod.model.mod import capacity_tokens, routed_blocks

    for block in routed_blocks(model).values():
        def forward(x, cos, sin, kv=None, block=block):
            k = capacity_tokens(block.capacity, x.shape[1])
            f = block.residual(x[:, :k], cos[:k], sin[:k])
            return torch.cat([x[:, :k] + f, x[:, k:]], dim=1)

        block.forward = forward  # before the first call: the compiled block traces this one


def child(a) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if a.tiny else "cuda")
    import torch
    import torch.distributed as dist

    from megamod.config import load_config
    from megamod.model.gpt import count_parameters
    from megamod.model.mod import routed_layers
    from megamod.parallel.dims import ParallelDims
    from megamod.train.data import micro_batches
    from megamod.model.flops import forward_flops_per_sequence, train_flops_per_step
    from megamod.train.trainer import Trainer

    cfg = load_config(None, _overrides(a))
    device = torch.device("cpu" if a.tiny else "cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    dist.init_process_group("gloo" if a.tiny else "nccl", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    dims = ParallelDims(tp=1, cp=1, dp=1, pp=1, rank=0)
    dims.build_groups()
    trainer = Trainer.build(cfg, dims, device)
    if a.variant == "mod-fixed":
        _fix_routing(trainer.model)
    batches = micro_batches(trainer.train_data, cfg.train.micro_batch_size, 0, 1, 0)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        trainer.train_step(batches).item()  # .item(): the step has finished on the device
        times.append(time.perf_counter() - t0)
    for m in trainer.model.modules():  # drop the routing statistics the steps accumulated
        getattr(m, "_stats", {}).clear()
    times = sorted(times[a.warmup:])
    res = {
        "variant": a.variant, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "flavour": a.flavour, "seq_len": a.seq_len,
        "micro_batch_size": a.micro_batch_size, "grad_accum": a.grad_accum, "dtype": "fp32" if a.tiny else "bf16",
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "dense_parameters": count_parameters(cfg.model)["total"],
        "routed_layers": routed_layers(cfg), "step_s": statistics.median(times),
        "step_p10_s": times[len(times) // 10], "step_p90_s": times[(9 * len(times)) // 10],
        "forward_flops_per_seq": forward_flops_per_sequence(cfg),
        "train_flops_per_step": train_flops_per_step(cfg, cfg.train.micro_batch_size * cfg.train.grad_accum),
    }
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if a.variant == "mod":
        res["per_routed_block_s"] = _routing_parts(cfg, device, iters=max(3, a.steps), compile=a.compile,
                                                   profile=f"{a.profile}.block.txt" if a.profile else None)
    if a.profile and device.type == "cuda":
        from train_throughput import _profile

        _profile(lambda: trainer.train_step(batches), device, f"{a.profile}.{a.variant}.txt")
    dist.destroy_process_group()
    return res


def _pair(r: dict) -> str:
    return f"{r['step_p10_s'] * 1e3:.1f} / {r['step_p90_s'] * 1e3:.1f}"


def _report(dense: dict, mod: dict) -> tuple[str, dict]:
    n_routed = len(mod["routed_layers"])
    parts = mod["per_routed_block_s"]
    overhead = n_routed * parts["routing_overhead"]
    speedup = dense["step_s"] / mod["step_s"]
    flops_ratio = dense["train_flops_per_step"] / mod["train_flops_per_step"]
    tokens = dense["micro_batch_size"] * dense["grad_accum"] * dense["seq_len"]
    lines = [
        f"device {dense['device']}, torch {dense['torch']}, {dense['flavour']} flavour, {dense['dtype']}, "
        f"batch {dense['micro_batch_size']} x seq {dense['seq_len']} x grad_accum {dense['grad_accum']} a step; "
        f"MoD routes blocks {mod['routed_layers']}",
        f"{'':>24} {'dense':>12} {'MoD':>12}",
        f"{'parameters':>24} {dense['parameters']:>12,d} {mod['parameters']:>12,d}",
        f"{'step ms (median)':>24} {dense['step_s'] * 1e3:>12.1f} {mod['step_s'] * 1e3:>12.1f}",
        f"{'step ms p10 / p90':>24} {_pair(dense):>12} {_pair(mod):>12}",
        f"{'tokens/s':>24} {tokens / dense['step_s']:>12,.0f} {tokens / mod['step_s']:>12,.0f}",
        f"{'fwd GFLOPs / sequence':>24} {dense['forward_flops_per_seq'] / 1e9:>12.1f} "
        f"{mod['forward_flops_per_seq'] / 1e9:>12.1f}",
        f"{'TFLOP/s (analytic)':>24} {dense['train_flops_per_step'] / dense['step_s'] / 1e12:>12.1f} "
        f"{mod['train_flops_per_step'] / mod['step_s'] / 1e12:>12.1f}",
    ]
    if "peak_mem_gib" in dense:
        lines.append(f"{'peak memory GiB':>24} {dense['peak_mem_gib']:>12.1f} {mod['peak_mem_gib']:>12.1f}")
    lines += [
        f"speedup per step: {speedup:.2f}x (FLOPs ratio {flops_ratio:.2f}x)",
        f"per routed block, fwd+bwd ms: full {parts['routed_block'] * 1e3:.2f} (a dense block "
        f"{parts['dense_block'] * 1e3:.2f}); routing only {parts['routing_overhead'] * 1e3:.3f} = scores "
        f"{parts['scores'] * 1e3:.3f} + top-k {parts['topk'] * 1e3:.3f} + gather/scatter "
        f"{parts['take_put'] * 1e3:.3f} + gate, losses, statistics",
        f"routing overhead (stand-alone blocks): {n_routed} x {parts['routing_overhead'] * 1e3:.3f} ms = "
        f"{overhead * 1e3:.2f} ms = {100 * overhead / mod['step_s']:.2f}% of the MoD step",
    ]
    summary = {"speedup": speedup, "flops_ratio": flops_ratio, "routing_overhead_frac": overhead / mod["step_s"],
               "dense": dense, "mod": mod}
    return "\n".join(lines), summary


def main(argv=None) -> int:
    a = _args(argv)
    if a.variant:  # child: one variant, JSON on the last stdout line
        print(json.dumps(child(a)), flush=True)
        return 0
    results = {}
    for variant in ("mod",) if a.only_mod else ("dense", "mod") + (("mod-fixed",) if a.ablate_routing else ()):
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
               "--variant", variant]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
            print(f"mod_speed: the {variant} run failed (exit {proc.returncode})", file=sys.stderr)
            return 2
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    if a.only_mod:
        print(json.dumps(results["mod"], indent=1))
        return 0
    text, summary = _report(results["dense"], results["mod"])
    if "mod-fixed" in results:
        fixed = results["mod-fixed"]
        summary["mod_fixed"] = fixed
        summary["routing_in_step_frac"] = (results["mod"]["step_s"] - fixed["step_s"]) / results["mod"]["step_s"]
        text += (f"\nin-step routing cost: MoD step {results['mod']['step_s'] * 1e3:.1f} ms - the same with fixed "
                 f"positions {fixed['step_s'] * 1e3:.1f} ms (p10/p90 {_pair(fixed)}) = "
                 f"{(results['mod']['step_s'] - fixed['step_s']) * 1e3:.1f} ms = "
                 f"{100 * summary['routing_in_step_frac']:.2f}% of the MoD step")
    print(text)
    # The stand-alone routed block is launch-bound (it times host latency the GPU-bound step
    # hides, results/mod_speed.md, session 3): where the in-step cost was measured, it decides.
    where = "in-step" if "routing_in_step_frac" in summary else "stand-alone"
    routing = summary["routing_in_step_frac" if where == "in-step" else "routing_overhead_frac"]
    speed_ok, routing_ok = summary["speedup"] >= 1.7, routing < 0.05
    ok = speed_ok and routing_ok
    print(f"targets: speed-up >= 1.7x {'met' if speed_ok else 'NOT met'} ({summary['speedup']:.2f}x); "
          f"routing overhead < 5% ({where}) {'met' if routing_ok else 'NOT met'} ({100 * routing:.2f}%)"
          + (" (tiny CPU smoke run: targets do not apply)" if a.tiny else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if a.check and not ok and not a.tiny else 0


if __name__ == "__main__":
    sys.exit(main())
