"""GPU checks + timing of MasterAdamW (session 6 probe)."""
import time, torch, sys
from megamod.train.master_adamw import MasterAdamW
dev = torch.device("cuda")
torch.manual_seed(0)
# 1. correctness: triton vs torch path on GPU, and weights == bf16(master) bitwise
shapes = [(333, 700), (50000,), (16,), (3, 4096), (2048, 5632)]
def make(update):
    ps = [torch.nn.Parameter(torch.randn(s, device=dev, generator=torch.Generator(dev).manual_seed(i))) for i, s in enumerate(shapes)]
    o = MasterAdamW([{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0}], lr=1e-2,
                    betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_norm=1.0)
    if update == "torch": o._update = o._update_torch
    return ps, o
pa, oa = make("triton"); pb, ob = make("torch")
for step in range(5):
    g = torch.Generator(dev).manual_seed(100 + step)
    gs = [(torch.randn(s, device=dev, generator=g) * (5 if step == 1 else 0.02)).bfloat16() for s in shapes]
    for pp in (pa, pb):
        for p, x in zip(pp, gs):
            p.grad = x.clone()
    if step == 3:
        for pp in (pa, pb): pp[2].grad = None
    if step == 4:
        for pp in (pa, pb): pp[1].grad[7] = float("nan")
    before = [p.detach().clone() for p in pa]
    oa.step(); ob.step()
    merr = max((oa.state[p]["master"] - ob.state[q]["master"]).abs().max().item() for p, q in zip(pa, pb))
    weq = all(torch.equal(p, oa.state[p]["master"].bfloat16()) for p in pa)
    print(f"step {step}: master |triton-torch| {merr:.3e}, weights == bf16(master): {weq}, norm {oa._global_grad_norm.item():.4g}",
          "unchanged p2" if step == 3 and torch.equal(before[2], pa[2]) else "",
          "skipped all" if step == 4 and all(torch.equal(b, p) for b, p in zip(before, pa)) else "")
# 2. optimizer step time, 1.26B params in the 1b shapes
d, f, L, V = 2048, 5632, 22, 32000
shp = [(V, d), (V, d), (d,)] + [s for _ in range(L) for s in [(d,), (d,), (3 * d, d), (d, d), (2 * f, d), (d, f)]]
def bench(kind):
    ps = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shp]
    if kind == "master":
        o = MasterAdamW(ps, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_norm=1.0)
        for p in ps: p.grad = torch.randn_like(p) * 1e-3
    else:
        sys.path.insert(0, ".")
        from megamod.train.clipping import ClippingAdamW
        o = ClippingAdamW(ps, max_norm=1.0, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for p in ps: p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in ps)
    for _ in range(3): o.step()
    torch.cuda.synchronize(); ts = []
    for _ in range(10):
        t = time.perf_counter(); o.step(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); ms = ts[5] * 1e3
    print(f"{kind}: {n/1e9:.3f}B params, step {ms:.2f} ms")
    del ps, o; torch.cuda.empty_cache()
if len(sys.argv) > 1: bench("clipping_adamw_fp32"); bench("master")
