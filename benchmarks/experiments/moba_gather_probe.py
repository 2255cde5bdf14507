"""Probe (one GPU): how much of dK/dV's time is the gathered (indexed) query stream? Times the
backward's kernels with the real sorted token list and with the same list replaced by contiguous
runs (values then meaningless, work and shapes the same). Result: benchmarks/results/moba_speed.md.

  python benchmarks/experiments/moba_gather_probe.py
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
from megamod.ops import moba_triton as mt  # noqa: E402
from megamod.ops import moba_plan as mp  # noqa: E402

H, D = 16, 128
for T, B, topk in ((131072, 512, 3), (262144, 4096, 12)):
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    cfg = mt.default_cfg(q, B)
    plan = mp._plan(q, k, cu, T, B, topk, cfg)
    out, lse2 = mt._forward(q, k, v, plan, cfg)
    E = plan["tok"].numel()
    contig = dict(plan, tok=(torch.arange(E, device="cuda") % T).to(torch.int32))
    for name, p in (("sorted", plan), ("contiguous", contig)):
        for _ in range(2):
            mt._backward(q, k, v, out, lse2, do, None, p, cfg)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                mt._backward(q, k, v, out, lse2, do, None, p, cfg)
            torch.cuda.synchronize()
        ev = {e.key: e.device_time_total / 3 / 1e3 for e in prof.key_averages() if e.device_time_total > 0}
        top = sorted(ev.items(), key=lambda x: -x[1])[:5]
        print(f"T={T} B={B} {name}: " + ", ".join(f"{k_[:22]} {t:.2f} ms" for k_, t in top), flush=True)
