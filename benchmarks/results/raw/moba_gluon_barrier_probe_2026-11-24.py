"""Backward with the Gluon vs the Triton dK/dV at head dim 64 and 128 (same inputs): dk/dv equal, times."""
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from megamod.ops import moba_plan as mp, moba_triton as mt  # noqa: E402
from persist_probe import qtime  # noqa: E402
import moba_check  # noqa: E402

print("check:", moba_check.check(lambda s: print(s, flush=True)), flush=True)
for T, B, topk, D, reps in ((32768, 512, 3, 128, 20), (131072, 512, 3, 128, 10), (1048576, 4096, 12, 128, 1), (32768, 512, 3, 64, 20)):
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(T, 16, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    res = {}
    for impl in ("triton", "gluon"):
        cfg = dict(mt.default_cfg(q, B), kv_impl=impl)
        plan = mp._plan(q, k, cu, T, B, topk, cfg)
        out, lse2 = mt._forward(q, k, v, plan, cfg)
        bwd = lambda: mt._backward(q, k, v, out, lse2, do, None, plan, cfg)  # noqa: E731
        g = bwd()
        res[impl] = (g, qtime(bwd, reps))
    (ga, ta), (gb, tb) = res["triton"], res["gluon"]
    same = all(torch.equal(a, b) for a, b in zip(ga, gb))
    print(f"T={T} B={B} topk={topk} D={D}: backward triton {ta:.3f} ms, gluon {tb:.3f} ms ({ta / tb:.2f}x); "
          f"dq/dk/dv identical: {same}", flush=True)
