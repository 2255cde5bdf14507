"""Sampling from a trained checkpoint.

    megamod-generate --run-dir runs/demo --prompt "def fibonacci(n):" --max-new-tokens 64

Weights come from the newest complete checkpoint through DeepSpeed's zero_to_fp32 (whatever the
ZeRO stage), into the single-device model with strict=True.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from megamod.config import build_config
from megamod.model.kv_cache import KVCache
from megamod.model.gpt import GPT, build_model
from megamod.model.mod import routed_blocks, routing


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """logits (1, V) -> next id (1, 1): greedy at temperature <= 0, else top-k sampling."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def sample(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
           eod_id: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Autoregressive sampling with a KV cache: one prefill over the prompt, then one token a step.

    Mixture-of-Depths blocks route causally (a token goes through iff sigmoid(prediction) > 0.5)
    and skipped tokens write nothing into that layer's cache. MoBA layers decode from the cache too,
    gating each new query on the cached block means (KVCache.for_model; same selection as a full
    forward).
    The prompt is cut from the left so prompt + new tokens fit in model.max_seq_len."""
    model.eval()
    device = next(model.parameters()).device
    prompt = prompt[-max(1, model.model_cfg.max_seq_len - max_new_tokens):]
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, n)
    cache = KVCache.for_model(model, batch_size=1, max_len=len(prompt) + max_new_tokens)
    out: list[int] = []
    with routing(model, "causal") if routed_blocks(model) else contextlib.nullcontext():
        logits = model(ids, positions=torch.arange(ids.shape[1], device=device), cache=cache)[:, -1].float()
        for _ in range(max_new_tokens):
            nxt = _pick(logits, temperature, top_k, generator)  # (1, 1)
            out.append(int(nxt))
            if (eod_id is not None and out[-1] == eod_id) or len(out) == max_new_tokens:
                break
            ids = torch.cat([ids, nxt], dim=1)
            pos = torch.tensor([ids.shape[1] - 1], device=device)
            logits = model(nxt, positions=pos, cache=cache)[:, -1].float()
    return out


def load_from_run(run_dir: str, tag: str | None = None, device: str = "cpu") -> tuple[GPT, dict]:
    from megamod.train.checkpoint import consolidated_state_dict, find_latest_complete, read_meta

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tag = tag or find_latest_complete(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}; train first (megamod-train)")
    raw = read_meta(ckpt_dir, tag)["config"]
    cfg = build_config(raw)
    model = build_model(cfg, device=device)
    model.load_state_dict(consolidated_state_dict(ckpt_dir, tag), strict=True)
    return model, raw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamod-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="the training run's --train.run_dir")
    ap.add_argument("--tag", help="checkpoint tag (default: newest complete)")
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-model", help="sentencepiece model (default: the run's --data.tokenizer_model)")
    args = ap.parse_args(argv)
    from megamod.data.tokenizer import Tokenizer

    model, raw = load_from_run(args.run_dir, args.tag)
    tok_path = args.tokenizer_model or raw["data"]["tokenizer_model"]
    if not tok_path:
        ap.error("the run has no --data.tokenizer_model; pass --tokenizer-model")
    tok = Tokenizer(tok_path)
    gen = torch.Generator().manual_seed(args.seed)
    out = sample(model, tok.encode(args.prompt), args.max_new_tokens, args.temperature, args.top_k,
                 eod_id=tok.eod_id, generator=gen)
    print(json.dumps({"prompt": args.prompt, "completion": tok.decode(out)}, ensure_ascii=False))
    print("---\n" + args.prompt + tok.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
