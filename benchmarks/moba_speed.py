"""MoBA (Triton) against dense causal attention (PyTorch SDPA: cuDNN and flash backends).

One GPU, heads 16, head dim 128, bf16, random inputs, one sequence per point, forward and
forward + backward (MoBA's gating, sort and planning included). Also: a bf16/fp32 check of the
kernels against the dense masked reference (benchmarks/moba_check.py), peak memory per point, an
optional tile-config sweep, and the fraction of 128x128 tiles a tile-sparse kernel (FlexAttention)
would have to visit for MoBA's per-token picks, and the FlexAttention peer with a coarser
chunk-level selection (benchmarks/flex_chunk.py), same inputs, side by side.

  python benchmarks/moba_speed.py --warm 14 --check --points 32768:512:3,131072:512:3,1048576:4096:12 \
      --dense-max 1048576 --json out.json --md out.md
  python benchmarks/moba_speed.py --warm 14 --points '' --sweep 131072:512:3,262144:4096:12:fwd+dq+kv

--warm N compiles every kernel variant the run needs first, in N processes at small sizes (Triton's
on-disk cache then serves the timed process): serially, ~80 variants took most of a 420 s call.
--auto runs the points (and the bf16 check cases of the same chunk) with the sweep's best configs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from megamod.ops import moba_plan as mp  # noqa: E402
from megamod.ops import moba_triton as mt  # noqa: E402
from cuda_timing import timed, timed_queued  # noqa: E402  (benchmarks/ is this script's directory)
from moba_check import CHECK_CASES, check  # noqa: E402
from flex_chunk import chunk_block_mask, tile_visit_fraction  # noqa: E402

H, D = 16, 128
DEV = "cuda"


def bench_point(T, B, topk, reps, dense, log, cfg, flex=True):
    torch.manual_seed(0)
    q = torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16)
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
    row = dict(T=T, B=B, topk=topk)

    def moba_fwd():
        with torch.no_grad():
            mt.moba_attn_varlen_triton(q, k, v, cu, T, B, topk, cfg=cfg)

    def moba_fb():
        q.grad = k.grad = v.grad = None
        mt.moba_attn_varlen_triton(q, k, v, cu, T, B, topk, cfg=cfg).backward(do)

    row["moba_fwd"], _ = timed(moba_fwd, reps)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    row["moba_fb"], _ = timed(moba_fb, reps)
    row["moba_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    row["inputs_gb"] = base / 2**30
    if T <= 131072:
        row["moba_fwd_q"] = timed_queued(moba_fwd, reps)
        row["moba_fb_q"] = timed_queued(moba_fb, reps)
    # breakdown of one forward + backward
    with torch.no_grad():  # in the op's order: own block, gate + plan, slot passes, backward
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        ev[0].record()
        plan = mt._plan_blocks(q, k, cu, T, B, topk)
        out, o32, lse2 = mt._forward_own(q, k, v, plan, cfg)
        ev[1].record()
        mt._plan_picks(q, k, plan, cfg)
        ev[2].record()
        mt._forward_past(q, k, v, out, o32, lse2, plan, cfg)
        ev[3].record()
        mt._backward(q, k, v, out, lse2, do, None, plan, cfg)
        ev[4].record()
        torch.cuda.synchronize()
        t_own, row["t_plan"], t_past, row["t_bwd"] = (ev[i].elapsed_time(ev[i + 1]) for i in range(4))
        row["t_fwd_attn"] = t_own + t_past
        del plan, out, o32, lse2
    log(f"moba T={T} B={B} topk={topk}: fwd {row['moba_fwd']:.2f} ms, fwd+bwd {row['moba_fb']:.2f} ms "
        f"(gate+plan {row['t_plan']:.2f}, attn fwd {row['t_fwd_attn']:.2f} = own {t_own:.2f} + slots "
        f"{t_past:.2f}, bwd {row['t_bwd']:.2f}); "
        + (f"queued: fwd {row['moba_fwd_q']:.2f} ms, fwd+bwd {row['moba_fb_q']:.2f} ms; " if "moba_fb_q" in row else "")
        + f"peak extra {row['moba_peak_gb']:.2f} GiB over inputs {row['inputs_gb']:.2f} GiB")
    if dense:
        qd, kd, vd, dod = (x.detach().view(1, T, H, D).transpose(1, 2) for x in (q, k, v, do))  # [1, H, T, D]
        qd.requires_grad_(), kd.requires_grad_(), vd.requires_grad_()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        dreps = max(1, reps if T <= 131072 else 1)
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            if T > 131072 and name == "flash" and not dense_flash_1m:
                continue

            def d_fwd():
                with torch.no_grad(), sdpa_kernel(be):
                    F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)

            def d_fb():
                qd.grad = kd.grad = vd.grad = None
                with sdpa_kernel(be):
                    F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).backward(dod)

            try:
                # at 1M one forward takes ~9 s: no separate warm-up either
                row[f"{name}_fwd"], _ = timed(d_fwd, dreps, warmup=1 if T <= 131072 else 0)
                # at 1M one fwd+bwd takes ~30 s: no separate warm-up (the forward is warm already)
                row[f"{name}_fb"], _ = timed(d_fb, dreps, warmup=1 if T <= 131072 else 0)
                queued = ""
                if "moba_fb_q" in row:
                    row[f"{name}_fwd_q"] = timed_queued(d_fwd, dreps)
                    row[f"{name}_fb_q"] = timed_queued(d_fb, dreps)
                    queued = (f"; queued: fwd {row[f'{name}_fwd_q']:.2f} ms, fwd+bwd {row[f'{name}_fb_q']:.2f} ms, "
                              f"speed-up fwd {row[f'{name}_fwd_q'] / row['moba_fwd_q']:.1f}x, "
                              f"fwd+bwd {row[f'{name}_fb_q'] / row['moba_fb_q']:.2f}x")
                log(f"dense {name} T={T}: fwd {row[f'{name}_fwd']:.2f} ms, fwd+bwd {row[f'{name}_fb']:.2f} ms; "
                    f"speed-up fwd {row[f'{name}_fwd'] / row['moba_fwd']:.1f}x, "
                    f"fwd+bwd {row[f'{name}_fb'] / row['moba_fb']:.2f}x" + queued)
            except RuntimeError as e:  # a backend that refuses the shape
                log(f"dense {name} T={T}: failed: {str(e)[:200]}")
    if flex:
        row.update(bench_flex(q, k, v, do, B, topk, reps, row, log))
    del q, k, v, do
    torch.cuda.empty_cache()
    return row


def bench_flex(q, k, v, do, B, topk, reps, row, log):
    """The FlexAttention peer on the same inputs (benchmarks/flex_chunk.py): chunk-level picks,
    compiled flex_attention, its block mask built before the timed calls (gate not counted)."""
    from torch.nn.attention.flex_attention import flex_attention

    T = q.shape[0]
    qf, kf, vf, dof = (x.detach().view(1, T, H, D).transpose(1, 2) for x in (q, k, v, do))  # [1, H, T, D]
    qf.requires_grad_(), kf.requires_grad_(), vf.requires_grad_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    mask = chunk_block_mask(qf, kf, B, topk)
    end.record()
    torch.cuda.synchronize()
    fn = torch.compile(flex_attention, dynamic=False)
    out = {"flex_mask_ms": start.elapsed_time(end)}

    def f_fwd():
        with torch.no_grad():
            fn(qf, kf, vf, block_mask=mask)

    def f_fb():
        qf.grad = kf.grad = vf.grad = None
        fn(qf, kf, vf, block_mask=mask).backward(dof)

    try:
        out["flex_fwd"], _ = timed(f_fwd, reps)
        out["flex_fb"], _ = timed(f_fb, reps)
        log(f"flex chunk-level T={T} B={B} topk={topk}: fwd {out['flex_fwd']:.2f} ms, fwd+bwd {out['flex_fb']:.2f} ms "
            f"(block mask {out['flex_mask_ms']:.1f} ms, not counted); MoBA faster by fwd "
            f"{out['flex_fwd'] / row['moba_fwd']:.2f}x, fwd+bwd {out['flex_fb'] / row['moba_fb']:.2f}x")
    except RuntimeError as e:  # out of memory, a shape it refuses
        log(f"flex chunk-level T={T}: failed: {str(e)[:200]}")
    del mask
    return out


SWEEP = {  # (bm, bn, warps, stages); gate: (bm, nblk, dc, warps, prec, stages)
    "gate": [(64, 32, 4, 4, "tf32x3", 3), (64, 32, 4, 4, "tf32x3", 1), (128, 32, 4, 8, "tf32x3", 2),
             (32, 32, 4, 4, "tf32x3", 2), (64, 32, 4, 4, "bf16split", 1), (64, 32, 4, 4, "bf16split", 3),
             (128, 32, 4, 8, "bf16split", 2), (64, 64, 4, 4, "bf16split", 2), (128, 64, 4, 8, "bf16split", 2)],
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 8, 2),
            (64, 128, 4, 2)],
    "dq": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3)],
    # kv loads its queries through the sorted token list (an index load, then the q/dO rows):
    # Triton pipelines such an indirect load only with >= 3 stages
    "kv": [(32, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 4), (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3),
           (64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 4)],
}
GATE_KEYS = ("bm", "nblk", "dc", "warps", "prec", "stages")
PHASE_KEYS = dict(gate=GATE_KEYS, **{p: ("bm", "bn", "warps", "stages") for p in ("fwd", "dq", "kv")})


def sweep_cfg(base, phase, var):
    """base with one phase's tile config replaced; the kv tiles are the Triton dK/dV kernel's, so
    their sweep runs that kernel (the Gluon one has fixed tiles, moba_gluon.BM/BN)."""
    cfg = dict(base, **{f"{phase}_{a}": b for a, b in zip(PHASE_KEYS[phase], var)})
    if phase == "kv":
        cfg["kv_impl"] = "triton"
    return cfg


def sweep(T, B, topk, log, phases, base):
    """Time each phase (gate+plan, forward attention, backward) for a few tile configs at one
    point; each variant changes one phase's config only, the rest stays at base."""
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
    plan = mp._plan(q, k, cu, T, B, topk, base)
    out, lse2 = mt._forward(q, k, v, plan, base)
    reps = 5 if T <= 131072 else 3
    best = {}
    for phase in phases:
        for var in SWEEP[phase]:
            cfg = sweep_cfg(base, phase, var)
            if phase == "gate":
                fn = lambda: mp._plan(q, k, cu, T, B, topk, cfg)  # noqa: E731
            else:
                if phase == "fwd":
                    fn = lambda: mt._forward(q, k, v, plan, cfg)  # noqa: E731
                else:
                    fn = lambda: mt._backward(q, k, v, out, lse2, do, None, plan, cfg)  # noqa: E731
            try:
                t, _ = timed(fn, reps)
                log(f"sweep T={T} B={B} {phase} {var}: {t:.2f} ms")
                if t < best.get(phase, (1e9,))[0]:
                    best[phase] = (t, var)
            except Exception as e:  # noqa: BLE001 (out of resources etc.)
                log(f"sweep T={T} B={B} {phase} {var}: failed {str(e)[:160]}")
    log(f"sweep best T={T} B={B}: {best}")
    upd = {}
    for phase, (_, var) in best.items():
        for key, val in zip(PHASE_KEYS[phase], var):
            upd[f"{phase}_{key}"] = val
    return upd


def warm_job(spec):
    """Compile (by running once at a small size) the kernels of one config, so that a pool of
    processes fills Triton's on-disk cache in parallel before anything is timed."""
    if spec["kind"] == "check":
        check(lambda s: None, only=spec["case"])
        return
    B, topk, cfg = spec["B"], spec["topk"], spec["cfg"]
    T = 4 * B
    torch.manual_seed(0)
    q, k, v = (torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
    mt.moba_attn_varlen_triton(q, k, v, cu, T, B, topk, cfg=cfg).backward(torch.randn_like(q))
    with torch.no_grad():
        mt.moba_attn_varlen_triton(q, k, v, cu, T, B, topk, cfg=cfg)
    torch.cuda.synchronize()


def warm(sweeps, points, overrides, workers, log, with_check=True):
    import json
    import subprocess
    import time

    jobs = [dict(kind="check", case=i) for i in range(len(CHECK_CASES))] if with_check else []
    for B, topk, phases in sorted(set((B, k, tuple(ph)) for _, B, k, ph in sweeps)):
        base = dict(mt.default_cfg(torch.empty(0, device=DEV, dtype=torch.bfloat16), B), **overrides)
        for phase in phases:
            for var in SWEEP[phase]:
                jobs.append(dict(kind="run", B=B, topk=topk, cfg=sweep_cfg(base, phase, var)))
    for B, topk in sorted(set(points)):
        jobs.append(dict(kind="run", B=B, topk=topk,
                         cfg=dict(mt.default_cfg(torch.empty(0, device=DEV, dtype=torch.bfloat16), B), **overrides)))
    t0 = time.time()
    running, failed = [], 0
    while jobs or running:
        while jobs and len(running) < workers:
            running.append(subprocess.Popen([sys.executable, __file__, "--warm-job", json.dumps(jobs.pop(0))],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.2)
        for pr in [x for x in running if x.poll() is not None]:
            failed += pr.returncode != 0
            running.remove(pr)
    log(f"warm-up compile: {time.time() - t0:.0f} s with {workers} processes ({failed} jobs failed)")


def profile(T, B, topk, log, cfg):
    """Per-kernel GPU time of one forward + backward (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.manual_seed(0)
    q, k, v = (torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16)
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
    for _ in range(2):
        mt.moba_attn_varlen_triton(q, k, v, cu, T, B, topk, cfg=cfg).backward(do)
        q.grad = k.grad = v.grad = None  # as in the timed runs: no gradient accumulation
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        mt.moba_attn_varlen_triton(q, k, v, cu, T, B, topk, cfg=cfg).backward(do)
        torch.cuda.synchronize()
    log(f"profile T={T} B={B} topk={topk}:")
    for line in p.key_averages().table(sort_by="cuda_time_total", row_limit=18).splitlines():
        log("  " + line[:160])


dense_flash_1m = False


def main():
    global dense_flash_1m
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", default="", help="T:chunk:topk[:phase+phase] points (comma list) to sweep "
                    "tile configs at (phases gate, fwd, dq, kv; default all)")
    ap.add_argument("--json", default="", help="write the rows and the log as JSON")
    ap.add_argument("--auto", action="store_true", help="run the points with the sweep's best configs (per chunk)")
    ap.add_argument("--warm", type=int, default=0, help="compile every config first, in this many processes")
    ap.add_argument("--warm-job", default="", help=argparse.SUPPRESS)
    ap.add_argument("--points", default="32768:512:3,131072:512:3,1048576:4096:12")
    ap.add_argument("--dense-max", type=int, default=131072, help="largest T for the dense baselines")
    ap.add_argument("--dense-flash-1m", action="store_true")
    ap.add_argument("--profile", default="", help="T:chunk:topk points (comma list) to profile")
    ap.add_argument("--tiles", action="store_true", help="tile-visit fraction of a tile-sparse kernel")
    ap.add_argument("--no-flex", action="store_true", help="leave out the FlexAttention chunk-level column")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--md", default="")
    ap.add_argument("--cfg", default="", help="overrides of GPU_CFG, e.g. fwd_bn=128,kv_bm=32")
    args = ap.parse_args()
    if args.warm_job:
        import json

        spec = json.loads(args.warm_job)
        warm_job(spec)
        return
    dense_flash_1m = args.dense_flash_1m
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    overrides = {}
    for kv in filter(None, args.cfg.split(",")):
        a, b = kv.split("=")
        overrides[a] = b if a in ("gate_prec", "kv_impl") else int(b)
    mt.GPU_CFG.update(overrides)
    cfg = dict(mt.GPU_CFG)
    import triton

    props = torch.cuda.get_device_properties(0)
    log(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; {props.name}, "
        f"{props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}, "
        f"cudnn {torch.backends.cudnn.version()}; cfg {cfg}")
    log("command: python " + " ".join(sys.argv))
    sweeps = []
    for p in filter(None, args.sweep.split(",")):
        f = p.split(":")
        T, B, k = map(int, f[:3])
        sweeps.append((T, B, k, f[3].split("+") if len(f) > 3 else list(SWEEP)))
    points = [tuple(map(int, p.split(":"))) for p in filter(None, args.points.split(","))]
    if args.warm:
        warm(sweeps, [(B, k) for _, B, k in points], overrides, args.warm, log, with_check=args.check)
    auto = {}
    for T, B, k, phases in sweeps:
        best = sweep(T, B, k, log, phases, dict(mt.default_cfg(torch.empty(0, device=DEV, dtype=torch.bfloat16), B),
                                                **overrides))
        if args.auto:
            auto.setdefault(B, {}).update(best)
    if auto:
        log(f"configs from the sweep (per chunk): {auto}")

    def point_cfg(B):
        return dict(mt.default_cfg(torch.empty(0, device=DEV, dtype=torch.bfloat16), B), **overrides,
                    **auto.get(B, {}))

    ok = True
    if args.check:  # the bf16 cases whose chunk is a point's run with that point's config
        ok = check(log, cfgs={B: point_cfg(B) for _, B, _ in points})
        torch.cuda.empty_cache()
    for p in filter(None, args.profile.split(",")):
        T, B, k = map(int, p.split(":"))
        profile(T, B, k, log, point_cfg(B))
    rows = []
    for T, B, k in points:
        reps = args.reps if T <= 131072 else 2
        pcfg = point_cfg(B)
        log(f"cfg T={T} B={B}: {pcfg}")
        rows.append(bench_point(T, B, k, reps, T <= args.dense_max, log, pcfg, flex=not args.no_flex))
        if args.json:  # after every point: a run stopped at its time limit keeps what it measured
            import json

            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
            with open(args.json, "w") as fh:
                json.dump(dict(rows=rows, log=lines, check=ok, argv=sys.argv, partial=True), fh, indent=1)
        if args.tiles and T <= 131072:
            f = tile_visit_fraction(T, B, k, H, D)
            rows[-1]["tile_frac"] = f
            log(f"tile-sparse (128x128) visit fraction for MoBA picks at T={T}: {f:.3f} of causal tiles")
    hdr = ("| T | chunk/topk | MoBA fwd ms | MoBA fwd+bwd ms | cuDNN fwd ms | cuDNN fwd+bwd ms | flash fwd ms | "
           "flash fwd+bwd ms | speed-up vs cuDNN fwd / fwd+bwd | queued: MoBA / cuDNN fwd+bwd ms, speed-up | "
           "MoBA peak GiB (over inputs) | Flex chunk-level fwd / fwd+bwd ms | MoBA vs Flex fwd+bwd |")
    table = [hdr, "|" + "---|" * 13]
    for r in rows:
        def f(x):
            return f"{r[x]:.1f}" if x in r else "-"
        sp = (f"{r['cudnn_fwd'] / r['moba_fwd']:.1f}x / {r['cudnn_fb'] / r['moba_fb']:.2f}x"
              if "cudnn_fb" in r else "-")
        qd = (f"{r['moba_fb_q']:.2f} / {r['cudnn_fb_q']:.2f}, {r['cudnn_fb_q'] / r['moba_fb_q']:.2f}x"
              if "cudnn_fb_q" in r else "-")
        table.append(f"| {r['T']} | {r['B']}/{r['topk']} | {f('moba_fwd')} | {f('moba_fb')} | {f('cudnn_fwd')} | "
                     f"{f('cudnn_fb')} | {f('flash_fwd')} | {f('flash_fb')} | {sp} | {qd} | {r['moba_peak_gb']:.2f} | "
                     f"{f('flex_fwd')} / {f('flex_fb')} | "
                     + (f"{r['flex_fb'] / r['moba_fb']:.2f}x |" if "flex_fb" in r else "- |"))
    for t in table:
        log(t)
    log(f"check {'passed' if ok else 'FAILED'}")
    if args.json:
        import json

        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, log=lines, check=ok, argv=sys.argv), fh, indent=1)
    if args.md:
        os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
        with open(args.md, "w") as fh:
            fh.write("# moba_speed\n\n```\n" + "\n".join(lines) + "\n```\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
