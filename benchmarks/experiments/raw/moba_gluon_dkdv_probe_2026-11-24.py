"""Gluon dK/dV (probe/gl_dkdv.py) vs the Triton _dkdv_kernel: same inputs, outputs compared, kernels timed queued."""
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from megamod.ops import moba_backward as mb, moba_plan as mp, moba_triton as mt  # noqa: E402
from megamod.ops.moba import moba_attn_varlen_reference  # noqa: E402
from gl_dkdv import dkdv_gluon  # noqa: E402
from persist_probe import qtime  # noqa: E402


def dkdv_triton(q, k, v, dout, lse2, delta, plan, cfg):
    T, H, D = q.shape
    Hkv = k.shape[1]
    B, KS, NBT = plan["B"], plan["KS"], plan["NBT"]
    sm_scale = D**-0.5
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    BM, BN = cfg["kv_bm"], cfg["kv_bn"]
    NKT = mp._cdiv(B, BN)
    tok, bounds = (plan["tok"], plan["seg_bounds"]) if KS > 0 else (plan["blk_len"], plan["blk_len"])
    mb._dkdv_kernel[(NBT * NKT, Hkv)](
        q, k, v, dout, lse2, delta, dk, dv, tok, bounds, plan["blk_start"], plan["blk_len"], H, NBT, NKT, KS,
        sm_scale * mp.LOG2E, sm_scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse2.stride(0), H // Hkv, D,
        BLOCK_D=triton.next_power_of_2(D), BM=BM, BN=BN, PREC="tf32", EVEN_D=True, ROW64=False,
        num_warps=cfg["kv_warps"], num_stages=cfg["kv_stages"])
    return dk, dv


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def case(lens, B, topk, H, Hkv, reps, ref=False):
    torch.manual_seed(0)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    T = int(cu[-1])
    q = torch.randn(T, H, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(T, Hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn(T, H, 128, device="cuda", dtype=torch.bfloat16)
    cfg = mt.default_cfg(q, B)
    plan = mp._plan(q, k, cu, max(lens), B, topk, cfg)
    out, lse2 = mt._forward(q, k, v, plan, cfg)
    delta = (do.float() * out.float()).sum(-1)
    a = dkdv_triton(q, k, v, do, lse2, delta, plan, cfg)
    VS = [tuple(map(int, x.split(","))) for x in os.environ.get("GLVS", "128,8,2").split(";")]
    b = dkdv_gluon(q, k, v, do, lse2, delta, plan, BN=VS[0][0], num_warps=VS[0][1], STAGES=VS[0][2])
    for bn, w, st in VS[1:]:
        c = dkdv_gluon(q, k, v, do, lse2, delta, plan, BN=bn, num_warps=w, STAGES=st)
        assert rel(c[0], b[0]) < 1e-6 and rel(c[1], b[1]) < 1e-6, (bn, w, st, rel(c[0], b[0]), rel(c[1], b[1]))
    msg = f"lens={lens if len(lens) < 4 else T} B={B} topk={topk} H={H}/{Hkv}: gluon vs triton dk {rel(b[0], a[0]):.1e} dv {rel(b[1], a[1]):.1e}"
    if ref:
        qq, kk, vv = (x.float().requires_grad_() for x in (q, k, v))
        o = moba_attn_varlen_reference(qq, kk, vv, cu, max(lens), B, topk)
        gk, gv = torch.autograd.grad(o, (kk, vv), do.float())
        msg += f"; vs fp32 reference: triton dk {rel(a[0], gk):.1e} dv {rel(a[1], gv):.1e}, gluon dk {rel(b[0], gk):.1e} dv {rel(b[1], gv):.1e}"
    if reps:
        ta = qtime(lambda: dkdv_triton(q, k, v, do, lse2, delta, plan, cfg), reps)
        msg += f"; dK/dV triton {ta:.3f} ms"
        for bn, w, st in VS:
            tb = qtime(lambda: dkdv_gluon(q, k, v, do, lse2, delta, plan, BN=bn, num_warps=w, STAGES=st), reps)
            msg += f", gluon {bn}/{w}w/{st}st {tb:.3f} ms ({ta / tb:.2f}x)"
    print(msg, flush=True)


print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
case([1000, 3000, 77], 64, 3, 4, 2, 0, ref=True)
case([4096], 512, 3, 16, 16, 0, ref=True)
case([2048, 1500], 128, 5, 8, 2, 0, ref=True)
case([8192], 4096, 12, 16, 16, 0, ref=True)
for spec in sys.argv[1:]:
    T, B, topk, reps = map(int, spec.split(":"))
    case([T], B, topk, 16, 16, reps)
