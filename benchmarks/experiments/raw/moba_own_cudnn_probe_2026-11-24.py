"""Own-block (block-diagonal causal) attention: MoBA's kernels at topk=1 vs cuDNN SDPA on the blocks as a batch."""
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megamod.ops import moba_plan as mp, moba_triton as mt  # noqa: E402
from persist_probe import qtime  # noqa: E402

H, D = 16, 128
for spec in sys.argv[1:]:
    T, B, reps = map(int, spec.split(":"))
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    cfg = mt.default_cfg(q, B)
    plan = mp._plan(q, k, cu, T, B, 1, cfg)
    fwd = lambda: mt._forward(q, k, v, plan, cfg)  # noqa: E731
    out, lse2 = fwd()
    bwd = lambda: mt._backward(q, k, v, out, lse2, do, None, plan, cfg)  # noqa: E731
    tf, tb = qtime(fwd, reps), qtime(bwd, reps)
    print(f"T={T} B={B} moba topk=1 (own block only): fwd {tf:.3f} bwd {tb:.3f} sum {tf + tb:.3f} ms", flush=True)
    nb = T // B
    qs, ks, vs = (x.view(nb, B, H, D).transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    dos = do.view(nb, B, H, D).transpose(1, 2)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                f1 = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
                o = f1()
                def fb():
                    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
                    return torch.autograd.grad(o, (qs, ks, vs), dos)
                t1, t2 = qtime(f1, reps), qtime(fb, reps)
                err = ((o.transpose(1, 2).reshape(T, H, D).float() - out.float()).norm() / out.float().norm()).item()
            print(f"T={T} B={B} {name} [nb={nb},H,{B},D] causal (strided views): fwd {t1:.3f} fwd+bwd {t2:.3f} ms; "
                  f"out vs moba topk=1 rel {err:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"T={T} B={B} {name}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    del q, k, v, do, out, lse2, plan, qs, ks, vs
    torch.cuda.empty_cache()
