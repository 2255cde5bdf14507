"""Every GEMM shape of the 1b training step (issue #9: 16384 tokens, d 2048, FFN 5632, vocab 32000,
22 layers, bf16), timed alone under cuBLAS, cuBLASLt, then cuBLAS again (CUDA events, median of
30 after 5 warm-up; cuda_timing.timed), and what they add up to per step, next to a bf16 8192^3 product:

    python3 benchmarks/experiments/gemm_shapes.py out.json

Compare the sum with the matmul time in the step's profile (train_throughput.py --profile): if the
step's GEMMs already run as fast as they do alone, no other GEMM algorithm choice is left to gain."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/: cuda_timing
from cuda_timing import timed  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = True
dev = torch.device("cuda")
M, d, f, V, L = 16384, 2048, 5632, 32000, 22


def shapes():
    # (name, count per step, m, n, k, layout): out[m,n] = A[m,k] @ B; layout says how B lies in memory
    out = []
    for name, n_out, n_in, cnt in (("qkvo", d, d, 4 * L), ("gate_up", f, d, 2 * L), ("down", d, f, L), ("logits", V, d, 1)):
        out.append((f"{name} fwd", cnt, M, n_out, n_in, "nt"))   # x[M,in] @ W[out,in]^T
        out.append((f"{name} dX", cnt, M, n_in, n_out, "nn"))    # dy[M,out] @ W[out,in]
        out.append((f"{name} dW", cnt, n_out, n_in, M, "tn"))    # dy[M,out]^T @ x[M,in]
    return out


def run(lib):
    torch.backends.cuda.preferred_blas_library(lib)
    res, total = [], 0.0
    for name, cnt, m, n, k, lay in shapes():
        if lay == "nt":
            A = torch.randn(m, k, device=dev, dtype=torch.bfloat16); B = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            fn = lambda: A @ B.t()
        elif lay == "nn":
            A = torch.randn(m, k, device=dev, dtype=torch.bfloat16); B = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
            fn = lambda: A @ B
        else:
            A = torch.randn(k, m, device=dev, dtype=torch.bfloat16); B = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
            fn = lambda: A.t() @ B
        ms = timed(fn, 30, warmup=5)[0]
        tf = 2 * m * n * k / ms / 1e9
        total += cnt * ms
        res.append((name, cnt, m, n, k, round(ms, 4), round(tf, 1)))
        del A, B
    big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = timed(lambda: big @ big, 30, warmup=5)[0]
    return {"lib": lib, "rows": res, "step_matmul_ms": round(total, 2), "8192^3 TFLOP/s": round(2 * 8192**3 / ms / 1e9, 1)}


out = [run(lib) for lib in ("cublas", "cublaslt", "cublas")]
for r in out:
    print(f"\n{r['lib']}: step matmuls {r['step_matmul_ms']} ms; 8192^3 {r['8192^3 TFLOP/s']} TFLOP/s")
    for row in r["rows"]:
        print("  {:<14} x{:<3} m {:<6} n {:<6} k {:<6} {:>8.3f} ms {:>7.1f} TFLOP/s".format(*row))
json.dump(out, open(sys.argv[1], "w"), indent=1)
