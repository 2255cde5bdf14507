"""Sampling from a trained checkpoint: batched prompts, a KV cache, MoD/MoBA-aware decoding.

    megamod-generate --run-dir runs/demo --prompt "def fibonacci(n):" --max-new-tokens 64
    megamod-generate --run-dir runs/demo --prompt "def " --prompt "class " --temperature 0   # greedy, batch 2

Weights come from any complete checkpoint (megamod.load_model). Prompts of different lengths are
right-padded and prefilled in one forward (padding writes no cache entry), then every row decodes
one token a step. Mixture-of-Depths blocks route causally (a token goes through iff
sigmoid(prediction) > 0.5; a skipped token writes no KV entry); MoBA layers decode sparsely (the
new query gates over the cached block means and attends to its selected blocks only). Prints the
time to first token and the decode rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass

import torch

from megamod.model.gpt import GPT
from megamod.model.kv_cache import KVCache
from megamod.model.mod import routed_blocks, routing


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, up to and including an end-of-document id
    prompt_tokens: int  # prompt tokens prefilled (after cutting to the model's length)
    ttft_s: float  # prefill + picking the first token
    decode_s: float  # the decode steps after it
    steps: int  # decode forwards (each gives every row one token)
    kv_entries: dict[int, list[int]]  # cache entries per layer and row (a MoD routed layer holds fewer)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens the decode steps produced (rows x steps) per second of them."""
        return len(self.tokens) * self.steps / self.decode_s if self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        return (f"batch {len(self.tokens)}, {self.prompt_tokens} prompt tokens: time to first token "
                f"{self.ttft_s * 1e3:.1f} ms; decode {self.decode_tokens_per_s:.1f} tokens/s "
                f"({self.steps} steps, {self.decode_s * 1e3 / max(1, self.steps):.2f} ms a step)")


def pick(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1): greedy at temperature <= 0, else sampling from the
    temperature-scaled distribution cut to the top_k most likely ids (0: all) and to the smallest
    set whose probability reaches top_p (1: all; the most likely id always stays)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before this id already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eod_id: int | None = None, generator: torch.Generator | None = None) -> Generation:
    """Decode ``max_new_tokens`` for every prompt (a row stops after ``eod_id``; the batch stops
    when every row has). Prompts are cut from the left so prompt + new tokens fit in
    model.max_seq_len. Without ``eod_id`` the loop never waits for the device between steps."""
    model.eval()
    device = next(model.parameters()).device
    keep = max(1, model.model_cfg.max_seq_len - max_new_tokens)
    prompts = [p[-keep:] for p in prompts]
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("every prompt needs at least one token")
    b, lens = len(prompts), torch.tensor([len(p) for p in prompts], device=device)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)  # (B, L) right-padded
    ragged = any(len(p) != width for p in prompts)
    valid = torch.arange(width, device=device) < lens[:, None] if ragged else None  # (B, L)
    cache = KVCache.for_model(model, batch_size=b, max_len=width + max_new_tokens)
    out: list[torch.Tensor] = []
    done = torch.zeros(b, 1, dtype=torch.bool, device=device)
    with routing(model, "causal") if routed_blocks(model) else contextlib.nullcontext():
        _sync(device)
        start = time.perf_counter()
        logits = model(ids, positions=torch.arange(width, device=device), cache=cache, valid=valid,
                       logits_at=lens - 1)[:, -1]  # (B, V)
        nxt = pick(logits, temperature, top_k, top_p, generator)  # (B, 1)
        out.append(nxt)
        _sync(device)
        first = time.perf_counter()
        steps = 0
        for step in range(1, max_new_tokens):
            if eod_id is not None:
                done |= nxt == eod_id
                if bool(done.all()):
                    break
            pos = (lens + (step - 1))[:, None]  # (B, 1): the fed token's position in its row
            logits = model(nxt, positions=pos, cache=cache)[:, -1]
            nxt = pick(logits, temperature, top_k, top_p, generator)
            out.append(nxt)
            steps += 1
        _sync(device)
        end = time.perf_counter()
    rows = torch.cat(out, 1).tolist()
    if eod_id is not None:
        rows = [r[:r.index(eod_id) + 1] if eod_id in r else r for r in rows]
    return Generation(rows, int(lens.sum()), first - start, end - first, steps, cache.lengths())


def sample(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
           eod_id: int | None = None, generator: torch.Generator | None = None, top_p: float = 1.0) -> list[int]:
    """One prompt's new tokens (``generate`` with a batch of one)."""
    return generate(model, [prompt], max_new_tokens, temperature, top_k, top_p, eod_id, generator).tokens[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamod-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="the training run's --train.run_dir (or a step_* directory)")
    ap.add_argument("--tag", help="checkpoint tag (default: newest complete)")
    ap.add_argument("--prompt", action="append", help="a prompt; repeat for a batch (default: 'def ')")
    ap.add_argument("--prompts-file", help="one prompt per line, decoded as one batch")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=50, help="0: no cut")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1: no cut")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--tokenizer-model", help="sentencepiece model (default: the run's --data.tokenizer_model)")
    args = ap.parse_args(argv)
    from megamod.infer.load import load_model, load_tokenizer

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    prompts = prompts or ["def "]
    try:
        model, _ = load_model(args.run_dir, args.tag, device=args.device,
                              dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        tok = load_tokenizer(args.run_dir, args.tag, args.tokenizer_model)
    except FileNotFoundError as e:
        ap.error(str(e))
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    result = generate(model, [tok.encode(p) or [tok.eod_id] for p in prompts], args.max_new_tokens,
                      args.temperature, args.top_k, args.top_p, eod_id=tok.eod_id, generator=gen)
    for p, ids in zip(prompts, result.tokens):
        print(json.dumps({"prompt": p, "completion": tok.decode(ids)}, ensure_ascii=False))
        print("---\n" + p + tok.decode(ids))
    print(result.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
