"""megamod-eval: validation loss, perplexity and bits per byte of a checkpoint on held-out text.

    megamod-eval --run-dir runs/demo --data data/stdlib_text_document         # a .bin/.idx prefix
    megamod-eval --run-dir runs/demo --data held_out.jsonl --json-key text     # raw documents

Any complete checkpoint (any grid it was trained on) runs as the single-device model. The tokens
are one stream, documents back to back — a .jsonl document is tokenized with the run's tokenizer
and followed by the end-of-document id, as ``preprocess_data.py --append-eod`` writes — cut into
windows of seq_len + 1 tokens that overlap by one, so every token but the first is predicted
exactly once (the last window may be shorter).

- loss: mean next-token negative log-likelihood in nats; ppl = exp(loss).
- bits per byte: the summed NLL / ln 2 / the UTF-8 bytes the predicted tokens spell (a piece's
  text with ▁ as a space, a <0xXX> piece one byte, control and end-of-document pieces none): a
  measure that does not depend on the tokenizer. Needs the tokenizer (the run's, or --tokenizer-model).
- Mixture-of-Depths models: with top-k routing (training's) and causal routing (generation's).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from megamod.data.tokenizer import Tokenizer
from megamod.model.gpt import GPT
from megamod.model.mod import has_causal_routing, routing

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def piece_bytes(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) UTF-8 bytes each id spells in decoded text (ids past the tokenizer's: 0)."""
    out = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(min(vocab_size, tok.vocab_size)):
        piece = tok.id_to_piece(i)
        if i == tok.eod_id:
            continue  # a document boundary, not text
        out[i] = 1 if _BYTE_PIECE.match(piece) else len(tok.decode([i]).encode("utf-8"))
    return out


def read_tokens(data: str, tok: Tokenizer | None, json_key: str = "text", max_tokens: int = 0) -> np.ndarray:
    """The evaluation stream: a .jsonl file's documents (tokenized, each + EOD) or a .bin/.idx
    dataset's documents, back to back, cut at ``max_tokens`` (0: all)."""
    parts, n = [], 0
    if data.endswith((".jsonl", ".json", ".ndjson")):
        if tok is None:
            raise FileNotFoundError("a .jsonl file needs the run's tokenizer: pass --tokenizer-model")
        with open(data) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{data}:{line_no}: not a JSON object with a {json_key!r} field") from None
                parts.append(np.array(tok.encode(text) + [tok.eod_id], dtype=np.int64))
                n += len(parts[-1])
                if max_tokens and n >= max_tokens:
                    break
    else:
        from megamod.data.indexed import IndexedDataset, strip_suffix

        ds = IndexedDataset(strip_suffix(data))
        for i in range(len(ds)):
            parts.append(np.asarray(ds[i], dtype=np.int64))
            n += len(parts[-1])
            if max_tokens and n >= max_tokens:
                break
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return stream[:max_tokens] if max_tokens else stream


@torch.no_grad()
def evaluate(model: GPT, stream: np.ndarray, seq_len: int, batch_size: int = 8,
             byte_table: torch.Tensor | None = None) -> dict[str, float]:
    """{"loss", "ppl", "tokens"[, "bits_per_byte", "bytes"]} of ``stream`` (layout in the module docstring)."""
    if len(stream) < 2:
        raise ValueError(f"only {len(stream)} tokens to evaluate; at least 2 are needed")
    device = next(model.parameters()).device
    tokens = torch.from_numpy(stream)
    starts = list(range(0, len(stream) - 1, seq_len))
    nll, count, nbytes = 0.0, 0, 0
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        full = [s for s in group if s + seq_len + 1 <= len(stream)]
        for rows in (full, [s for s in group if s not in full]):  # same-length windows batch together
            if not rows:
                continue
            length = min(seq_len + 1, len(stream) - rows[0])
            batch = torch.stack([tokens[s:s + length] for s in rows]).to(device)  # (B, S + 1)
            logits = model(batch[:, :-1])
            nll += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
            if byte_table is not None:
                nbytes += int(byte_table[batch[:, 1:].cpu()].sum())
    out = {"loss": nll / count, "ppl": math.exp(min(nll / count, 50.0)), "tokens": count}
    if byte_table is not None and nbytes:
        out.update(bits_per_byte=nll / math.log(2) / nbytes, bytes=nbytes)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamod-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="run directory (or its checkpoints/, or a step_* directory)")
    ap.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    ap.add_argument("--data", required=True, help=".bin/.idx prefix (or either file), or a .jsonl file")
    ap.add_argument("--json-key", default="text", help="the .jsonl field holding the text")
    ap.add_argument("--seq-len", type=int, default=0, help="window length (default: the run's --train.seq_len)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens (0: all)")
    ap.add_argument("--tokenizer-model", help="sentencepiece model (default: the run's --data.tokenizer_model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args(argv)
    from megamod.infer.load import load_model, load_tokenizer

    try:
        model, cfg = load_model(args.run_dir, args.tag, device=args.device,
                                dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        try:
            tok = load_tokenizer(args.run_dir, args.tag, args.tokenizer_model)
        except FileNotFoundError:
            tok = None  # a .bin/.idx dataset still gives loss and ppl
        stream = read_tokens(args.data, tok, args.json_key, args.max_tokens)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    seq_len = args.seq_len or cfg.train.seq_len
    table = piece_bytes(tok, cfg.model.vocab_size) if tok is not None else None
    result = {"data": args.data, "seq_len": seq_len, **evaluate(model, stream, seq_len, args.batch_size, table)}
    if has_causal_routing(model):
        with routing(model, "causal"):
            causal = evaluate(model, stream, seq_len, args.batch_size, table)
        result.update({f"{k}_causal": v for k, v in causal.items() if k not in ("tokens", "bytes")})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
