"""The whole MoBA backward with the Gluon vs the Triton dK/dV on the same inputs (GPU): the GPU check first,
then per point the backward time of each (queued back to back) and whether dq/dk/dv are bit-identical.

    PYTHONPATH=$PWD python3 benchmarks/experiments/raw/moba_gluon_backward_probe_2026-11-24.py [--check-case I] T:chunk:topk:D:reps ...

--check-case I runs moba_check's case I only (default: every case)."""
import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import moba_check  # noqa: E402
from moba_speed import timed_queued  # noqa: E402
from megamod.ops import moba_plan as mp, moba_triton as mt  # noqa: E402


ap = argparse.ArgumentParser()
ap.add_argument("--check-case", type=int, default=None)
ap.add_argument("points", nargs="+")
args = ap.parse_args()
only = None if args.check_case is None else args.check_case % len(moba_check.CHECK_CASES)
print("check:", moba_check.check(lambda s: print(s, flush=True), only=only), flush=True)
for spec in args.points:
    T, B, topk, D, reps = map(int, spec.split(":"))
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(T, 16, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    res = {}
    for impl in ("triton", "gluon"):
        cfg = dict(mt.default_cfg(q, B), kv_impl=impl)
        plan = mp._plan(q, k, cu, T, B, topk, cfg)
        out, lse2 = mt._forward(q, k, v, plan, cfg)
        bwd = lambda: mt._backward(q, k, v, out, lse2, do, None, plan, cfg)  # noqa: E731
        res[impl] = (bwd(), timed_queued(bwd, reps))
    (ga, ta), (gb, tb) = res["triton"], res["gluon"]
    same = all(torch.equal(a, b) for a, b in zip(ga, gb))
    print(f"T={T} B={B} topk={topk} D={D}: backward triton {ta:.3f} ms, gluon {tb:.3f} ms ({ta / tb:.2f}x); "
          f"dq/dk/dv identical: {same}", flush=True)
