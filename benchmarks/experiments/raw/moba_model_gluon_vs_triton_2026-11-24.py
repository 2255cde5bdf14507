"""A small MoBA model (head dim 128, GQA) trained 12 steps on the GPU with the Gluon dK/dV and with the
Triton dK/dV, from the same seed: the losses must agree (the two kernels' dk/dv are bit-identical)."""
import sys

import torch

sys.path.insert(0, ".")
from megamod.config import load_config  # noqa: E402
from megamod.model.gpt import build_model  # noqa: E402
from megamod.ops import moba_triton as mt  # noqa: E402
from megamod.parallel.parallelize import lm_loss  # noqa: E402

cfg = load_config(None, ["--model.d_model", "512", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads",
                         "2", "--model.ffn_hidden", "1024", "--model.vocab_size", "1000", "--model.max_seq_len", "4096",
                         "--model.attention", "moba", "--moba.chunk_size", "512", "--moba.topk", "3",
                         "--data.synthetic", "true"])
runs = {}
for impl in ("triton", "gluon"):
    mt.GPU_CFG["kv_impl"] = impl
    torch.manual_seed(0)
    model = build_model(cfg, device=torch.device("cuda"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 1000, (2, 4097), device="cuda", generator=g)
    losses = []
    for _ in range(12):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    runs[impl] = losses
    print(impl, " ".join(f"{x:.4f}" for x in losses), flush=True)
print("max |loss difference|:", max(abs(a - b) for a, b in zip(runs["triton"], runs["gluon"])))
print("loss fell:", runs["gluon"][-1] < runs["gluon"][0] - 0.5)
