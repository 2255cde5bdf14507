"""A dense megamod checkpoint as a Hugging Face ``LlamaForCausalLM`` directory (tools/convert_to_hf.py).

    out/
        config.json                          LlamaConfig built from our ModelConfig (never copied)
        generation_config.json               bos/eos/pad ids
        model-00001-of-0000N.safetensors     weights in HF names, HF order, at most --max-shard-size each
        model.safetensors.index.json         {"metadata": {"total_size"}, "weight_map": {name: file}}
        tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model   (hf_tokenizer.py)

Our block is Llama's (pre-norm RMSNorm, SwiGLU, MHA/GQA, no biases), so the weights map one to one
(``hf_name``). RoPE: both rotate halves (pairs (i, i + D/2), megamod/model/rope.py and HF's
``rotate_half``), so q/k projections are copied without a permutation — the logits check
(``verify``) is what holds that. Tied embeddings: ``tie_word_embeddings`` and no ``lm_head.weight``.

Mixture-of-Depths and MoBA models are refused (``refusal``): Llama computes every token in every
block with dense attention, so an export would be a different model; the README says why megamod
ships no trust_remote_code modelling code instead.
"""

from __future__ import annotations

import json
import os
import re

import torch

from megamod.config import Config, build_config
from megamod.model.gpt import build_model

# ours -> HF, per block; names outside blocks below
_BLOCK = {"attention_norm.weight": "input_layernorm.weight", "attention.wq.weight": "self_attn.q_proj.weight",
          "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
          "attention.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
          "feed_forward.w2.weight": "mlp.down_proj.weight"}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(RuntimeError):
    """The checkpoint cannot become a LlamaForCausalLM, or the written export does not match it."""


def hf_name(name: str) -> str:
    """megamod parameter name -> HF Llama name ("layers.3.attention.wq.weight" ->
    "model.layers.3.self_attn.q_proj.weight")."""
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _BLOCK:
        raise ExportError(f"parameter {name} has no Hugging Face Llama counterpart")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"


def our_name(hf: str) -> str:
    """The inverse of ``hf_name``."""
    for ours, theirs in _TOP.items():
        if hf == theirs:
            return ours
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    inv = {v: k for k, v in _BLOCK.items()}
    if not m or m.group(2) not in inv:
        raise ExportError(f"{hf} is not a LlamaForCausalLM parameter megamod knows")
    return f"layers.{m.group(1)}.{inv[m.group(2)]}"


def refusal(cfg: Config) -> str | None:
    """Why this model cannot be a LlamaForCausalLM, or None for a dense model."""
    from megamod.model.mod import routed_layers

    n = cfg.model.n_layers
    moba = [] if cfg.model.attention != "moba" else sorted(set(range(n)) - {i % n for i in cfg.moba.full_attention_layers})
    routed = routed_layers(cfg)
    if not (moba or routed):
        return None
    what = []
    if routed:
        what.append(f"Mixture-of-Depths blocks {routed} process only the tokens their router/predictor selects")
    if moba:
        what.append(f"MoBA layers {moba} attend to the top-{cfg.moba.topk} blocks of {cfg.moba.chunk_size} keys "
                    f"per query")
    return ("cannot export to Hugging Face LlamaForCausalLM: " + "; ".join(what) + ", and Llama computes every "
            "token in every block with dense attention, so the export would be a different model. megamod ships no "
            "trust_remote_code modelling code (README: 'Hugging Face export'); use megamod.load_model, "
            "megamod-generate and megamod-eval for this checkpoint")


def hf_config(cfg: Config, ids: dict[str, int | None], dtype: torch.dtype):
    from transformers import LlamaConfig

    m = cfg.model
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim, hidden_act="silu",
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, initializer_range=m.init_std,
        bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"), pad_token_id=ids.get("pad"),
        torch_dtype=str(dtype).removeprefix("torch."), architectures=["LlamaForCausalLM"])


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: Config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our full state dict -> HF names in HF order (embedding, blocks, norm, head), ``dtype``."""
    names = ["tok_embeddings.weight", *[f"layers.{i}.{k}" for i in range(cfg.model.n_layers) for k in _BLOCK],
             "norm.weight"] + ([] if cfg.model.tie_embeddings else ["output.weight"])
    missing = sorted(set(names) - set(sd))
    if missing:
        raise ExportError(f"checkpoint lacks {missing[:5]}")
    return {hf_name(n): sd[n].detach().to(dtype).contiguous() for n in names}


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    """Shards of at most ``max_shard_bytes`` (a larger tensor gets its own) plus the index; in
    the given order, so the same tensors give the same bytes."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, names in zip(files, shards):
        save_file({n: tensors[n] for n in names}, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def export(sd: dict[str, torch.Tensor], raw_config: dict, out_dir: str, dtype: str = "auto",
           tokenizer_model: str | None = None, max_shard_bytes: int = 5 * 2**30, verify: bool = True) -> dict:
    """Write ``out_dir`` (layout in the module docstring) from a full state dict and the run's
    saved config; then, unless ``verify`` is off, check it in transformers. Returns a report."""
    from transformers import GenerationConfig

    from megamod.infer.hf_tokenizer import save_hf_tokenizer, special_ids

    cfg = build_config(raw_config)
    why = refusal(cfg)
    if why:
        raise ExportError(why)
    dtypes = {t.dtype for t in sd.values()}
    out_dtype = _DTYPES[dtype] if dtype != "auto" else (dtypes.pop() if len(dtypes) == 1 else torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    ids = {"bos": None, "eos": None, "pad": None}
    if tokenizer_model:
        ids = save_hf_tokenizer(tokenizer_model, out_dir)
    files = write_safetensors(to_hf_state_dict(sd, cfg, out_dtype), out_dir, max_shard_bytes)
    hf_config(cfg, ids, out_dtype).save_pretrained(out_dir)
    GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]).save_pretrained(out_dir)
    report = {"output": out_dir, "dtype": str(out_dtype), "shards": files, "tokenizer": bool(tokenizer_model)}
    if verify:
        report["max_abs_logit_diff"] = verify_logits(sd, cfg, out_dir, out_dtype)
        if tokenizer_model:
            from megamod.infer.hf_tokenizer import check_ids

            check_ids(out_dir, tokenizer_model, sample_texts(tokenizer_model))
            report["tokenizer_checked"] = True
    return report


def verify_logits(sd: dict[str, torch.Tensor], cfg: Config, out_dir: str, dtype: torch.dtype,
                  tol: float = 1e-4, seed: int = 0) -> float:
    """LlamaForCausalLM loaded from ``out_dir`` (fp32) against our model with the same exported
    weights (rounded to ``dtype``, computed in fp32) on a random batch; ExportError past ``tol``."""
    from transformers import LlamaForCausalLM

    ours = build_model(cfg)
    ours.load_state_dict({k: v.to(dtype).float() for k, v in sd.items()}, strict=True)
    ours.eval()
    theirs = LlamaForCausalLM.from_pretrained(out_dir).float().eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, min(64, cfg.model.max_seq_len)), generator=gen)
    with torch.no_grad():
        diff = (ours(tokens).float() - theirs(tokens).logits.float()).abs().max().item()
    if not diff <= tol:
        raise ExportError(f"export check failed: transformers' logits differ from megamod's by {diff:.3g} "
                          f"(tolerance {tol:g}) on a random batch; {out_dir} is not a faithful export")
    return diff


def sample_texts(tokenizer_model: str, n: int = 16, seed: int = 0) -> list[str]:
    """Texts for the tokenizer check: fixed ones (code, whitespace runs, non-ASCII, the
    end-of-document piece) and decodings of random id sequences (every kind of piece)."""
    from megamod.data.tokenizer import EOD_PIECE, Tokenizer

    tok = Tokenizer(tokenizer_model)
    fixed = ["def f(x):\n    return x  # ok\n\n\tdone", "  two  spaces, trailing ", "ünïcödé 日本語 🙂 \x00",
             f"end{EOD_PIECE}start", "12345 67.89e-3", ""]
    gen = torch.Generator().manual_seed(seed)
    rand = [tok.decode(torch.randint(0, tok.vocab_size, (48,), generator=gen).tolist()) for _ in range(n)]
    control = [tok.id_to_piece(i) for i in (tok.bos_id, tok.unk_id, tok.pad_id) if i is not None] + ["</s>"]
    return fixed + [t for t in rand if not any(c in t for c in control)]  # hf_tokenizer.py: the one difference
