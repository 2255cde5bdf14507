"""Would the optimizer step hide under the next forward's GEMMs if it ran on a second stream (issue #9)?

    python3 benchmarks/experiments/optimizer_overlap.py out.json

Stream A: the 1b forward's GEMM chain for one micro-batch (22 layers × 7 products, 16384 tokens,
bf16). Stream B: torch's fused AdamW over 1.26e9 fp32 parameters in 22 chunks (28 B per parameter,
the same traffic as MasterAdamW). Times A alone, B alone, A then B, and A and B launched together on
two streams (cuda_timing.timed: median of 10 after 3 warm-up, two rounds). If the two streams take about
max(A, B), the bandwidth-bound step hides under the compute-bound GEMMs; if about A + B, it does not."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/: cuda_timing
from cuda_timing import timed  # noqa: E402

dev = torch.device("cuda")
M, d, f, L, N = 16384, 2048, 5632, 22, 1_261_529_088
x = torch.randn(M, d, device=dev, dtype=torch.bfloat16)
Ws = [(torch.randn(d, d, device=dev, dtype=torch.bfloat16) * 0.02) for _ in range(4)]
Wg = [(torch.randn(f, d, device=dev, dtype=torch.bfloat16) * 0.02) for _ in range(2)]
Wd = torch.randn(d, f, device=dev, dtype=torch.bfloat16) * 0.02


def gemms():
    h = x
    for _ in range(L):
        for W in Ws:
            y = h @ W.t()
        g = h @ Wg[0].t(); u = h @ Wg[1].t()
        h = u @ Wd.t()
    return h


chunks = 22
n = N // chunks
p = [torch.zeros(n, device=dev) for _ in range(chunks)]
g = [torch.randn(n, device=dev) * 1e-3 for _ in range(chunks)]
m = [torch.zeros(n, device=dev) for _ in range(chunks)]
v = [torch.zeros(n, device=dev) for _ in range(chunks)]
steps = [torch.zeros((), device=dev) for _ in range(chunks)]


def adam():
    torch._fused_adamw_(p, g, m, v, [], steps, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8,
                        amsgrad=False, maximize=False)


sa, sb = torch.cuda.Stream(), torch.cuda.Stream()


def both():
    cur = torch.cuda.current_stream()
    sa.wait_stream(cur); sb.wait_stream(cur)
    with torch.cuda.stream(sa):
        gemms()
    with torch.cuda.stream(sb):
        adam()
    cur.wait_stream(sa); cur.wait_stream(sb)


def serial():
    gemms(); adam()


res = {}
for rnd in range(2):
    for name, fn in (("gemms", gemms), ("adamw", adam), ("serial", serial), ("two_streams", both)):
        res[f"{name}_{rnd}"] = round(timed(fn, 10, warmup=3)[0], 2)
        print(name, rnd, res[f"{name}_{rnd}"], "ms", flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
