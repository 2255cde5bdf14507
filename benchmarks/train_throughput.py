"""Dense training throughput on one GPU: HF transformers (eager, compiled) vs megamod's trainer step.

    python benchmarks/train_throughput.py                       # the 1.26B model of issue 9: a, b, c
    python benchmarks/train_throughput.py --which b,c,c1,d      # engine variants side by side
    python benchmarks/train_throughput.py --which 2b --micro-batch-2b 4   # the 2b flavour, trainer (c)
    python benchmarks/train_throughput.py --tiny                # CPU smoke test of the script itself

Same architecture and batch for a-d: hidden 2048, 22 layers, 16 heads, FFN 5632, vocab 32000,
seq 2048, micro-batch 8, untied embeddings.
(a) HF LlamaForCausalLM, fp32 weights + bf16 autocast, fused AdamW, SDPA attention, eager;
(b) the same under torch.compile;
(c) megamod: the real Trainer.train_step through the DeepSpeed engine, ZeRO-0 with
    train.bf16_mode auto = master_fused on one GPU (bf16 weights; MasterAdamW holds the fp32
    master weights and moments, clips and steps them in one kernel), --compile compiles each
    block; --zero-stage picks another stage;
(ca) (c) with train.bf16_mode autocast (fp32 weights, bf16 autocast, a fused AdamW that clips in
    its kernel): (c) before master_fused;
(c1) the same trainer at ZeRO-1, bf16_mode auto = master_weights (bf16 weights, fp32 master
    weights in DeepSpeed's optimizer): the issue's original (c);
(d) megamod's model without DeepSpeed in HF's recipe (dl: its loss compiled; dm: dl with bf16
    weights and MasterAdamW);
(2b) the trainer as (c) on the 2b flavour (d 2560, 24 layers, 20 heads, FFN 6912) at --micro-batch-2b.
Each: warm-up excluded, median of --steps steps, CUDA-synchronised wall time per step.
MFU by the PaLM formula: (6N + 12·L·d·S) FLOPs per token, N = parameters other than the input
embedding, against 989 TFLOP/s (H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

PEAK = 989e12


def palm_flops_per_token(n_params_no_emb: int, layers: int, d: int, seq: int) -> float:
    return 6 * n_params_no_emb + 12 * layers * d * seq


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bench_hf(args, device, compiled: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.d, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=args.seq, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compiled else model
    ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    n_no_emb = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    times = time_steps(step, device, args.warmup + (2 if compiled else 0), args.steps)
    out = _summary("HF + torch.compile" if compiled else "HF eager", times, args, n_no_emb, device)
    del model, opt, fwd
    return out


def shape_2b(args) -> argparse.Namespace:
    """args with the 2b flavour's shape and --micro-batch-2b (MFU and tokens use these)."""
    from megamod.config import FLAVOURS

    f = FLAVOURS["2b"]
    return argparse.Namespace(**{**vars(args), "flavour": "2b", "d": f["d_model"], "layers": f["n_layers"],
                                 "heads": f["n_heads"], "ffn": f["ffn_hidden"], "vocab": f["vocab_size"],
                                 "micro_batch": args.micro_batch_2b, "grad_accum": args.grad_accum_2b})


def bench_megamod(args, device, zero_stage: int, extra: tuple[str, ...] = ()) -> dict:
    import torch.distributed as dist

    from megamod.config import load_config
    from megamod.model.gpt import count_parameters
    from megamod.parallel.dims import ParallelDims
    from megamod.train.data import micro_batches
    from megamod.train.engine import resolve_precision
    from megamod.train.trainer import Trainer

    overrides = ["--model.flavour", args.flavour, "--model.d_model", str(args.d), "--model.n_layers", str(args.layers),
                 "--model.n_heads", str(args.heads), "--model.n_kv_heads", str(args.heads), "--model.ffn_hidden",
                 str(args.ffn), "--model.vocab_size", str(args.vocab), "--model.max_seq_len", str(args.seq),
                 "--train.seq_len", str(args.seq), "--train.micro_batch_size", str(args.micro_batch),
                 "--train.steps", str(args.warmup + args.steps + 5), "--optim.zero_stage", str(zero_stage),
                 "--train.grad_accum", str(getattr(args, "grad_accum", 1)),
                 "--train.compile", str(args.compile).lower(), "--train.activation_checkpointing",
                 str(args.ac).lower(), "--data.synthetic", "true", "--checkpoint.resume", "false",
                 "--logging.tensorboard", "false", "--train.run_dir", "/tmp/megamod-throughput",
                 "--train.device", device.type, *extra, *args.overrides]
    cfg = load_config(None, overrides)
    if not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29591")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    dims = ParallelDims(tp=1, cp=1, dp=1, pp=1, rank=0)
    dims.build_groups()
    trainer = Trainer.build(cfg, dims, device)
    batches = micro_batches(trainer.train_data, cfg.train.micro_batch_size, 0, 1, 0)
    times = time_steps(lambda: trainer.train_step(batches), device, args.warmup + (2 if args.compile else 0),
                       args.steps)
    if args.profile and args.variant == args.profile_variant:
        _profile(lambda: trainer.train_step(batches), device, args.profile)
    n_no_emb = count_parameters(cfg.model)["non_embedding"]
    label = (f"megamod {args.flavour} (DeepSpeed ZeRO-{zero_stage}, {resolve_precision(cfg, device)}"
             + (", compiled blocks)" if args.compile else ")"))
    out = _summary(label, times, args, n_no_emb, device)
    del trainer, batches
    return out


def _profile(step, device, path: str, iters: int = 3) -> None:
    """``iters`` profiled calls of ``step``: kernel launches per call and the top kernels and CPU
    ops by self time go to ``path``, the totals to stdout."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            step()
        _sync(device)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=60, max_name_column_width=70)
    cpu = events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    idle = ""
    if device.type == "cuda":
        prof.export_chrome_trace(path + ".trace.json")
        idle = _device_idle(path + ".trace.json", iters)
    with open(path, "w") as f:
        f.write(f"kernel launches per call: {launches / iters:.0f}\n{idle}\n\n" + table + "\n\n" + cpu)
    print(idle)
    print("\n".join(table.splitlines()[-2:]))  # totals; "Self CPU" includes time waiting in synchronize calls


def _device_idle(trace_path: str, iters: int, top: int = 15) -> str:
    """Where the GPU waits: from the profiler's trace, the span from the first to the last device
    activity, the time no kernel, copy or memset runs, and the largest gaps with the kernels on
    either side (a gap after a synchronisation is the host's launch latency)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    dev = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    gaps, end = [], dev[0][1]
    for (s, e, name), (_, _, before) in zip(dev[1:], dev):
        if s > end:
            gaps.append((s - end, before, name))
        end = max(end, e)
    span, idle = (end - dev[0][0]) / 1e3, sum(g for g, _, _ in gaps) / 1e3
    lines = [f"device span {span / iters:.1f} ms per call, idle {idle / iters:.2f} ms per call "
             f"({len(gaps) / iters:.0f} gaps); largest gaps (us, kernel before -> kernel after):"]
    lines += [f"  {g:9.1f}  {b[:60]} -> {a[:60]}" for g, b, a in sorted(gaps, reverse=True)[:top]]
    return "\n".join(lines)


def bench_megamod_plain(args, device, compile_loss: bool = False, master: bool = False) -> dict:
    """megamod's model without DeepSpeed, in HF's recipe (fp32 weights + bf16 autocast, fused
    AdamW, blocks compiled): separates the model code's speed from the engine's overhead.
    ``compile_loss``: the cross-entropy over the (B, S, V) logits under torch.compile too.
    ``master``: bf16 weights with megamod's MasterAdamW (fp32 master weights) instead of autocast."""
    from megamod.config import load_config
    from megamod.model.gpt import build_model, count_parameters
    from megamod.model.transforms import apply_compile
    from megamod.parallel.loss import lm_loss

    cfg = load_config(None, ["--model.d_model", str(args.d), "--model.n_layers", str(args.layers), "--model.n_heads",
                             str(args.heads), "--model.n_kv_heads", str(args.heads), "--model.ffn_hidden", str(args.ffn),
                             "--model.vocab_size", str(args.vocab), "--model.max_seq_len", str(args.seq),
                             "--data.synthetic", "true"])
    model = build_model(cfg, device=device)
    if args.compile:
        apply_compile(model)
    if master:
        from megamod.train.master_adamw import MasterAdamW

        opt = MasterAdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, max_norm=1.0)
        model.to(torch.bfloat16)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not master)
    loss_fn = torch.compile(lm_loss) if compile_loss else lm_loss

    def step():
        with amp:
            loss = loss_fn(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, device, args.warmup + (2 if args.compile else 0), args.steps)
    label = ("megamod model, no DeepSpeed (" + ("bf16 + MasterAdamW" if master else "HF recipe")
             + (", compiled loss)" if compile_loss else ")"))
    out = _summary(label, times, args, count_parameters(cfg.model)["non_embedding"], device)
    del model, opt
    return out


def _summary(label: str, times: list[float], args, n_no_emb: int, device) -> dict:
    med = statistics.median(times)
    tokens = args.micro_batch * getattr(args, "grad_accum", 1) * args.seq
    flops = palm_flops_per_token(n_no_emb, args.layers, args.d, args.seq) * tokens
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"name": label, "step_ms": med * 1e3, "p10_ms": sorted(times)[len(times) // 10] * 1e3,
            "p90_ms": sorted(times)[9 * len(times) // 10] * 1e3, "tokens_per_s": tokens / med,
            "tflops": flops / med / 1e12, "mfu": flops / med / PEAK, "peak_mem_gib": mem}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", default="a,b,c",
                    help="a: HF eager, b: HF compiled, c: megamod trainer (--zero-stage), ca: c with "
                         "train.bf16_mode autocast, c1: megamod trainer at ZeRO-1 (bf16 master weights), d: megamod "
                         "model without DeepSpeed, dl: d with the loss compiled, dm: dl with bf16 weights and "
                         "MasterAdamW, 2b: trainer (c) on the 2b flavour at --micro-batch-2b")
    ap.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage of variant c")
    ap.add_argument("--micro-batch-2b", type=int, default=4)
    ap.add_argument("--grad-accum-2b", type=int, default=1, help="micro-batches per optimizer step of variant 2b")
    ap.add_argument("--flavour", default="1b")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing in megamod")
    ap.add_argument("--profile", help="profile 3 extra steps of --profile-variant, tables written to this file")
    ap.add_argument("--profile-variant", default="c", help="which megamod trainer variant (c, c1, 2b) to profile")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny shape")
    ap.add_argument("--json", help="write results here")
    args, args.overrides = ap.parse_known_args()
    if args.tiny:
        args.d, args.layers, args.heads, args.ffn, args.vocab, args.seq, args.micro_batch = 64, 2, 4, 128, 512, 64, 2
        args.steps, args.warmup, args.compile, args.flavour = 3, 1, False, "debug"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for w in args.which.split(","):
        w = w.strip()
        gc.collect()  # the previous variant's model, optimizer and engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        args.variant = w
        r = {"a": lambda: bench_hf(args, device, False), "b": lambda: bench_hf(args, device, True),
             "c": lambda: bench_megamod(args, device, args.zero_stage), "c1": lambda: bench_megamod(args, device, 1),
             "ca": lambda: bench_megamod(args, device, args.zero_stage, ("--train.bf16_mode", "autocast")),
             "d": lambda: bench_megamod_plain(args, device), "dl": lambda: bench_megamod_plain(args, device, True),
             "dm": lambda: bench_megamod_plain(args, device, True, master=True),
             "2b": lambda: bench_megamod(shape_2b(args), device, args.zero_stage)}[w]()
        r.update(variant=w, wall_s=time.perf_counter() - t0)
        results.append(r)
        print(json.dumps(r), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}, torch {torch.__version__}; 1b: d {args.d}, L {args.layers}, S {args.seq}, "
          f"B {args.micro_batch}; 2b: B {args.micro_batch_2b} x accum {args.grad_accum_2b}")
    print(f"{'':<4}{'':<58}{'step ms':>9}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}{'wall s':>8}")
    for r in results:
        print(f"{r['variant']:<4}{r['name'][:57]:<58}{r['step_ms']:>9.1f}{r['tokens_per_s']:>10.0f}{r['tflops']:>9.1f}"
              f"{r['mfu']:>7.1%}{r['peak_mem_gib']:>9.1f}{r['wall_s']:>8.0f}")
    by = {r["variant"]: r for r in results}
    for v in ("c", "ca", "c1", "d", "dl", "dm"):
        if v in by and "b" in by:
            print(f"({v})/(b) = {by[v]['tokens_per_s'] / by['b']['tokens_per_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
