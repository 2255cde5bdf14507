"""Generation speed: Mixture-of-Depths and MoBA decoding against the dense model, side by side.

    python benchmarks/generate_speed.py --json out.json --md out.md     # one GPU: 1b flavour, bf16
    python benchmarks/generate_speed.py --tiny                           # CPU smoke check (debug flavour, fp32)

Through ``megamod.infer.generate.generate`` (KV cache, greedy, no end-of-document stop, so no
host sync per step beyond the model's own), random weights, random prompt ids:

- decode tokens/s at batch 1 and 16, prompt 2048, 256 new tokens: MoD (capacity 0.125, every 2nd
  block) vs dense. Issue 23's target: MoD >= 1.4x (the MoD paper: "upwards of 50% faster").
- a 128K-token prompt at batch 1, 64 new tokens: MoBA (every layer; chunk 512, top-3, the 128K
  point of moba_speed.py) vs dense: prefill time (time to first token) and per-token decode.

Routing with random weights: an untrained predictor passes about half the tokens, not the 12.5%
a trained one passes (its BCE target is top-k membership). So each routed block's causal
threshold is calibrated on the prompt to the (1 - capacity) quantile of its predictor logits —
compute then matches a trained MoD model's; the measured fraction of tokens routed is printed.
Each case runs once untimed first (a shorter prompt where the full one is slow), then timed:
TTFT = prefill + picking the first token; decode = the remaining steps, device synchronised at
both ends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)
from megamod.config import load_config  # noqa: E402
from megamod.infer.generate import generate  # noqa: E402
from megamod.model.gpt import GPT  # noqa: E402
from megamod.model.mod import routed_blocks  # noqa: E402


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke check: debug flavour, fp32, short prompts")
    ap.add_argument("--flavour", default=None, help="default 1b (debug with --tiny)")
    ap.add_argument("--prompt", type=int, default=None, help="MoD case prompt length (default 2048; 64 tiny)")
    ap.add_argument("--new", type=int, default=None, help="MoD case new tokens (default 256; 16 tiny)")
    ap.add_argument("--batches", default=None, help="MoD case batch sizes (default 1,16; 1,4 tiny)")
    ap.add_argument("--long-prompt", type=int, default=None, help="MoBA case prompt (default 131072; 512 tiny; 0: skip)")
    ap.add_argument("--long-new", type=int, default=None, help="MoBA case new tokens (default 64; 8 tiny)")
    ap.add_argument("--chunk", type=int, default=None, help="MoBA block size (default 512; 16 tiny)")
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--capacity", type=float, default=0.125)
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    t = a.tiny
    a.flavour = a.flavour or ("debug" if t else "1b")
    a.prompt = a.prompt or (64 if t else 2048)
    a.new = a.new or (16 if t else 256)
    a.batches = [int(b) for b in (a.batches or ("1,4" if t else "1,16")).split(",")]
    a.long_prompt = (512 if t else 131072) if a.long_prompt is None else a.long_prompt
    a.long_new = a.long_new or (8 if t else 64)
    a.chunk = a.chunk or (16 if t else 512)
    return a


def build(a, device, dtype, *flags, base: GPT | None = None) -> GPT:
    """A random model, initialised on the device (values do not matter for speed); with ``base``,
    its weights where the names match (MoD adds router and predictor, MoBA changes nothing)."""
    cfg = load_config(None, ["--data.synthetic", "true", "--model.flavour", a.flavour,
                             "--model.max_seq_len", str(max(a.prompt + a.new, a.long_prompt + a.long_new)), *flags])
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02, generator=gen)
        if base is not None:
            model.load_state_dict(base.state_dict(), strict=False)
    return model.to(dtype).eval()


@torch.no_grad()
def calibrate(model: GPT, prompts: torch.Tensor, capacity: float) -> None:
    """Each routed block passes a token iff its predictor logit exceeds the (1 - capacity)
    quantile of the logits it gave the prompt's tokens (a trained predictor's rate)."""
    logits: dict[str, torch.Tensor] = {}
    hooks = [b.predictor.register_forward_hook(lambda m, i, o, n=n: logits.__setitem__(n, o.float().flatten()))
             for n, b in routed_blocks(model).items()]
    model(prompts)  # top-k routing: every block sees every token's input to its predictor
    for h in hooks:
        h.remove()
    for name, block in routed_blocks(model).items():
        c = torch.quantile(logits[name][:100_000], 1.0 - capacity).item()
        block._causal_logit = lambda scores, c=c: scores[..., 1] - c
        block.pop_stats("eval")  # the calibration forward's statistics


def run(model: GPT, prompts: torch.Tensor, new: int, warm_prompts: torch.Tensor | None = None) -> dict:
    generate(model, (warm_prompts if warm_prompts is not None else prompts).tolist(), min(new, 8))
    g = generate(model, prompts.tolist(), new)
    row = {"batch": prompts.shape[0], "prompt": prompts.shape[1], "new": new, "ttft_ms": g.ttft_s * 1e3,
           "decode_tokens_per_s": g.decode_tokens_per_s, "ms_per_step": g.decode_s * 1e3 / g.steps}
    routed = [int(name.split(".")[-1]) for name in routed_blocks(model)]  # "layers.3" -> 3
    if routed:  # cache entries of the routed layers over the tokens every dense layer stored
        row["fraction_routed"] = (sum(sum(g.kv_entries[i]) for i in routed) / len(routed)) / sum(g.kv_entries[0])
    return row


def main(argv=None) -> int:
    a = _args(argv)
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log = lambda s: print(s, flush=True)  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    rows: dict[str, dict] = {}
    dense = build(a, device, dtype)
    vocab = dense.model_cfg.vocab_size
    mod = build(a, device, dtype, "--mod.enabled", "true", "--mod.capacity", str(a.capacity), base=dense)
    for b in a.batches:
        prompts = torch.randint(0, vocab, (b, a.prompt), generator=gen).to(device)
        calibrate(mod, prompts, a.capacity)
        for label, model in (("dense", dense), ("mod", mod)):
            rows[f"{label}_b{b}"] = r = run(model, prompts, a.new)
            log(f"{label:5s} batch {b:2d}, prompt {a.prompt}: TTFT {r['ttft_ms']:8.1f} ms, decode "
                f"{r['decode_tokens_per_s']:8.1f} tokens/s ({r['ms_per_step']:.2f} ms a step)"
                + (f", {r['fraction_routed']:.3f} of tokens routed" if "fraction_routed" in r else ""))
    del mod
    if a.long_prompt:
        moba = build(a, device, dtype, "--model.attention", "moba", "--moba.chunk_size", str(a.chunk),
                     "--moba.topk", str(a.topk), base=dense)
        prompt = torch.randint(0, vocab, (1, a.long_prompt), generator=gen).to(device)
        short = prompt[:, :min(a.long_prompt, 8192)]
        for label, model, warm in (("dense", dense, short), ("moba", moba, prompt)):  # MoBA: Triton JIT at full size
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows[f"{label}_long"] = r = run(model, prompt, a.long_new, warm)
            log(f"{label:5s} batch  1, prompt {a.long_prompt}: TTFT {r['ttft_ms']:8.1f} ms, decode "
                f"{r['ms_per_step']:.2f} ms a token")
    ratios = {f"mod_vs_dense_decode_b{b}": rows[f"mod_b{b}"]["decode_tokens_per_s"] / rows[f"dense_b{b}"]["decode_tokens_per_s"]
              for b in a.batches}
    if a.long_prompt:
        ratios["moba_vs_dense_prefill"] = rows["dense_long"]["ttft_ms"] / rows["moba_long"]["ttft_ms"]
        ratios["moba_vs_dense_decode"] = rows["dense_long"]["ms_per_step"] / rows["moba_long"]["ms_per_step"]
    for k, v in ratios.items():
        log(f"{k}: {v:.2f}x" + ("  (target >= 1.4x)" if k.startswith("mod") else ""))
    out = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
           "command": "python benchmarks/generate_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "flavour": a.flavour, "dtype": str(dtype), "capacity": a.capacity, "moba": {"chunk": a.chunk, "topk": a.topk},
           "rows": rows, "ratios": ratios}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(out))
    return 0


def markdown(out: dict) -> str:
    lines = [f"{out['date']}, {out['device']}, torch {out['torch']}, {out['flavour']} flavour, {out['dtype']}, "
             f"random weights; `{out['command']}`", "",
             "| case | batch | prompt | new | TTFT ms | decode tokens/s | ms a step | routed |", "|---|---|---|---|---|---|---|---|"]
    for k, r in out["rows"].items():
        routed = f"{r['fraction_routed']:.3f}" if "fraction_routed" in r else ""
        lines.append(f"| {k} | {r['batch']} | {r['prompt']} | {r['new']} | {r['ttft_ms']:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | {routed} |")
    lines += ["", *[f"- {k}: **{v:.2f}x**" for k, v in out["ratios"].items()], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
