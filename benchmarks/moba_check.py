"""MoBA kernels against the dense masked reference on the GPU (used by moba_speed.py --check).

Fresh random inputs per case: out, lse and the q/k/v gradients against the fp32 reference on the
same inputs (bf16 within 1e-2, fp32 within 1e-5 relative), the gate's picks against torch's fp32
selection (the configured precision and the exact "fma" gate), and the slot order the slot passes
rely on. The bf16 cases run with the configs the timed points use.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from megamod.ops import moba_plan as mp  # noqa: E402
from megamod.ops import moba_triton as mt  # noqa: E402
from megamod.ops.moba import moba_attn_varlen_reference, moba_select_blocks  # noqa: E402

DEV = "cuda"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CHECK_CASES = [  # lens, chunk, topk, H, Hkv, D, dtype
    ([1000, 3000, 77], 64, 3, 4, 2, 128, torch.bfloat16),
    ([4096], 512, 3, 16, 16, 128, torch.bfloat16),
    ([2048, 1500], 128, 5, 8, 2, 128, torch.bfloat16),
    ([2500, 1700], 128, 4, 4, 1, 64, torch.float32),
    ([777, 1290], 100, 3, 4, 4, 96, torch.float32),
    ([8192], 4096, 12, 16, 16, 128, torch.bfloat16),  # the long-block kernels (1M point's configs)
    ([3000, 1000], 256, 4, 8, 2, 64, torch.bfloat16),  # head dim 64 (the Gluon dK/dV's other shape)
]


def check(log, only=None, cfgs=None):
    """Kernels vs the dense reference (fp32 math on the same inputs), fresh random inputs.
    cfgs: {chunk: config} for the bf16 cases (the configs the timed points use), else defaults."""
    torch.manual_seed(1)
    ok = True
    for i, (lens, B, topk, h, hkv, d, dt) in enumerate(CHECK_CASES):
        if only is not None and i != only:
            continue
        cfg = (cfgs or {}).get(B) if dt == torch.bfloat16 else None
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
        T = int(cu[-1])
        q = torch.randn(T, h, d, device=DEV, dtype=dt, requires_grad=True)
        k = torch.randn(T, hkv, d, device=DEV, dtype=dt, requires_grad=True)
        v = torch.randn(T, hkv, d, device=DEV, dtype=dt, requires_grad=True)
        do = torch.randn(T, h, d, device=DEV, dtype=dt)
        o, lse = mt.moba_attn_varlen_triton(q, k, v, cu, max(lens), B, topk, return_lse=True, cfg=cfg)
        g = torch.autograd.grad(o, (q, k, v), do)
        q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
        o_r, lse_r = moba_attn_varlen_reference(q32, k32, v32, cu, max(lens), B, topk, return_lse=True)
        g_r = torch.autograd.grad(o_r, (q32, k32, v32), do.float())
        picks = mt.moba_gate_triton(q, k, cu, max(lens), B, topk, cfg=cfg).long().sort(-1).values
        picks_r = moba_select_blocks(q, k, cu, B, topk).sort(-1).values
        agree = (picks == picks_r).all(-1).float().mean().item()
        fma = dict(mt.default_cfg(q, B), gate_prec="fma")
        picks_f = mt.moba_gate_triton(q, k, cu, max(lens), B, topk, cfg=fma).long().sort(-1).values
        agree_fma = (picks_f == picks_r).all(-1).float().mean().item()
        # slot order the slot passes rely on: a row at position t holds min(KS, t // B) picks in
        # its last slots (moba_triton._gate_kernel)
        raw = mt.moba_gate_triton(q, k, cu, max(lens), B, topk, cfg=cfg)
        pos = torch.cat([torch.arange(n, device=DEV) for n in lens])
        want = (torch.arange(topk - 1, device=DEV)[None, :]
                >= (topk - 1) - torch.clamp(pos // B, max=topk - 1)[:, None])
        slots_ok = bool(torch.equal(raw >= 0, want[:, None, :].expand_as(raw)))
        errs = [rel(o, o_r), rel(lse, lse_r)] + [rel(a, b) for a, b in zip(g, g_r)]
        del o_r, lse_r, g_r, q32, k32, v32
        tol = 1e-2 if dt == torch.bfloat16 else 1e-5
        good = max(errs) < tol and torch.isfinite(o).all().item() and slots_ok
        ok &= good
        log(f"check {str(dt)[6:]:8s} lens={lens} B={B} topk={topk} H={h}/{hkv} D={d}: "
            f"out {errs[0]:.2e} lse {errs[1]:.2e} dq {errs[2]:.2e} dk {errs[3]:.2e} dv {errs[4]:.2e} "
            f"(tol {tol:g}) picks agree with torch fp32: "
            f"{mp.gate_precision(cfg or mt.default_cfg(q, B), dt)} {agree:.5f}, "
            f"fma {agree_fma:.5f}, slot order {'ok' if slots_ok else 'WRONG'} -> {'OK' if good else 'FAIL'}")
    return ok
