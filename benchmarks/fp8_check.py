"""One training step in FP8 against the same step in bf16, on the GPU (tp 1): the issue's
"a GPU test of one tp=1 step vs bf16 within FP8 tolerance".

    python benchmarks/fp8_check.py          # exit 1 unless every case is within tolerance

A small MoD model (d 1024, 4 blocks, 2 of them routed at 12.5%: 128 of 1024 tokens, FFN 2816,
vocabulary 8192), dense (cuDNN) or MoBA attention (blocks of 128, top 3), bf16 weights, micro-batch
4; the FP8 copy (tensorwise, rowwise) starts from the bf16 model's state dict. One forward +
backward + torch AdamW step (lr 1e-3), then a second forward. Tolerances (tests/unit/test_fp8.py
derives the rounding; the numbers below are this model's on CPU, where torch's _scaled_mm runs the
same casts): both losses within 1% relative (measured 1e-5 before the step, 4e-4 and 6e-4 after
it); the gradients of all block weights taken together at cosine ≥ 0.98 to bf16's (measured
0.9968 tensorwise, 0.9991 rowwise), and each weight's at ≥ 0.5, which only a broken layer misses
(its gradient would be unrelated: cosine ~0). Each weight alone is looser than the whole: the
routed blocks' weights see 512 of the 4096 tokens, and at init their q/k gradients largely cancel
across tokens, so FP8's rounding is a larger share of them (measured 0.83-0.96 there, 0.98-0.99
in the dense blocks).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODEL = ["--data.synthetic", "true", "--model.d_model", "1024", "--model.n_layers", "4", "--model.n_heads", "8",
          "--model.n_kv_heads", "8", "--model.ffn_hidden", "2816", "--model.vocab_size", "8192", "--train.seq_len",
          "1024", "--mod.enabled", "true", "--mod.capacity", "0.125"]
_ATTENTION = {"sdpa": [], "moba": ["--model.attention", "moba", "--moba.chunk_size", "128", "--moba.topk", "3"]}


def _one_step(model, batch):
    import torch

    from megamod.parallel.loss import lm_loss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=batch.is_cuda)
    loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    opt.step()
    with torch.no_grad():
        after = lm_loss(model(batch[:, :-1]), batch[:, 1:])
    return loss.item(), after.item(), grads


def fp8_check(device) -> dict:
    import torch
    import torch.nn.functional as F

    from megamod.config import load_config
    from megamod.model.gpt import build_model
    from megamod.parallel.fp8 import apply_fp8, check_fp8_support, is_fp8_linear

    check_fp8_support(device)
    cases, ok = {}, True
    for attention, flags in _ATTENTION.items():
        cfg = load_config(None, [*_MODEL, *flags])
        torch.manual_seed(0)
        ref_model = build_model(cfg, device=device).to(torch.bfloat16)
        state = {k: v.clone() for k, v in ref_model.state_dict().items()}
        batch = torch.randint(0, cfg.model.vocab_size, (4, cfg.train.seq_len + 1), device=device,
                              generator=torch.Generator(device).manual_seed(0))
        ref = _one_step(ref_model, batch)
        del ref_model
        for recipe in ("tensorwise", "rowwise"):
            model = build_model(cfg, device=device).to(torch.bfloat16)
            model.load_state_dict(state)
            apply_fp8(model, recipe)
            got = _one_step(model, batch)
            names = [n for n in got[2] if is_fp8_linear(n.rpartition(".")[0])]
            cos = {n: F.cosine_similarity(got[2][n].flatten(), ref[2][n].flatten(), dim=0).item() for n in names}
            every = F.cosine_similarity(torch.cat([got[2][n].flatten() for n in names]),
                                        torch.cat([ref[2][n].flatten() for n in names]), dim=0).item()
            case = {"loss": got[0], "loss_bf16": ref[0], "loss_after_step": got[1], "loss_after_step_bf16": ref[1],
                    "grad_cos": every, "min_grad_cos": min(cos.values()), "worst": min(cos, key=cos.get),
                    "grad_cos_by_weight": cos}
            case["pass"] = (abs(got[0] - ref[0]) <= 0.01 * ref[0] and abs(got[1] - ref[1]) <= 0.01 * ref[1]
                            and every >= 0.98 and case["min_grad_cos"] >= 0.5)
            ok &= case["pass"]
            cases[f"{attention}/{recipe}"] = case
            del model
    return {"cases": cases, "verdict": "PASS" if ok else "FAIL"}


if __name__ == "__main__":
    import json

    import torch

    out = fp8_check(torch.device("cuda", 0))
    print(json.dumps(out, indent=1))
    sys.exit(0 if out["verdict"] == "PASS" else 1)
