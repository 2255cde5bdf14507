"""A Hugging Face Llama directory as a megamod weights-only checkpoint (tools/convert_from_hf.py).

    OUTPUT/
        checkpoints/step_00000000/consolidated.pt, megamod_complete.json   (train/checkpoint.py)
        config.yaml          the model section (and the tokenizer) as megamod-train flags expect them
        tokenizer.model      the sentencepiece model, when the HF directory has one

Training continues from it on any grid with ``megamod-train --config OUTPUT/config.yaml
--checkpoint.load OUTPUT --train.run_dir NEW ...``. Tensors keep their dtype and bits, so
exporting the result again (hf_export.py) gives the same weights, bit for bit. Local directories
only: nothing is downloaded. What megamod's model cannot compute — biases, rope scaling, another
activation, a head dim other than hidden/heads — is refused, naming the config field.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch

from megamod.config import Config, ModelConfig
from megamod.infer.hf_export import ExportError, our_name
from megamod.train.checkpoint import save_weights


def model_config_from_hf(hf: dict) -> ModelConfig:
    """config.json (transformers 4 or 5 layout) -> ModelConfig, or ExportError naming the field."""
    if hf.get("model_type") != "llama":
        raise ExportError(f"model_type {hf.get('model_type')!r}: only Llama (LlamaForCausalLM) converts")
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"}
                                         if rope.get("rope_type", "default") != "default" else None)
    heads = hf["num_attention_heads"]
    problems = [f"{k}={hf[k]!r}" for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}")
    if scaling:
        problems.append(f"rope scaling {scaling!r}")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        problems.append(f"head_dim={hf['head_dim']} (megamod's is hidden_size / num_attention_heads)")
    if problems:
        raise ExportError(f"cannot convert: megamod's model has no {', '.join(problems)}")
    return ModelConfig(flavour="debug", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                       n_layers=hf["num_hidden_layers"], n_heads=heads,
                       n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 4096), rope_theta=float(theta),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings")))


def read_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """The model's tensors: the files its safetensors index names, or model.safetensors, or
    (older directories) pytorch_model*.bin."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(hf_dir, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        files = [p for p in [os.path.join(hf_dir, "model.safetensors")] if os.path.isfile(p)]
    out: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            out.update(load_file(f))
        return out
    for f in sorted(glob.glob(os.path.join(hf_dir, "pytorch_model*.bin"))):
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    if not out:
        raise ExportError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights")
    return out


def _check_shapes(sd: dict[str, torch.Tensor], cfg: Config) -> None:
    """The converted names and shapes are exactly the megamod model's (before anything is written)."""
    from megamod.model.gpt import GPT

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [f"{k} {tuple(sd[k].shape)} (config says {want[k]})" for k in sorted(set(want) & set(sd))
             if tuple(sd[k].shape) != want[k]]
    if missing or extra or wrong:
        raise ExportError(f"the weights do not match config.json: missing {missing[:4]}, unexpected {extra[:4]}, "
                          f"shapes {wrong[:4]}")


def convert(hf_dir: str, output: str) -> dict:
    """Write OUTPUT (layout in the module docstring); returns a report."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"{hf_dir}: no config.json (a local Hugging Face model directory is needed)")
    with open(path) as f:
        model = model_config_from_hf(json.load(f))
    hf_sd = read_hf_weights(hf_dir)
    sd = {our_name(k): v for k, v in hf_sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.tie_embeddings:
        if "output.weight" in sd and not torch.equal(sd["output.weight"], sd["tok_embeddings.weight"]):
            raise ExportError("tie_word_embeddings is true but lm_head.weight differs from embed_tokens.weight")
        sd["output.weight"] = sd["tok_embeddings.weight"]  # one storage, as in the tied model's state_dict
    elif "output.weight" not in sd:
        raise ExportError("no lm_head.weight and tie_word_embeddings is false")
    _check_shapes(sd, Config(model=model))
    os.makedirs(output, exist_ok=True)
    tokenizer = ""
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        tokenizer = os.path.abspath(os.path.join(output, "tokenizer.model"))
        shutil.copyfile(os.path.join(hf_dir, "tokenizer.model"), tokenizer)
    cfg = Config(model=model)
    cfg.data.tokenizer_model = tokenizer
    cfg.train.seq_len = min(cfg.train.seq_len, model.max_seq_len)
    tag = save_weights(os.path.join(output, "checkpoints"), sd, cfg.to_dict(), source=os.path.abspath(hf_dir))
    import yaml

    fields = {k: v for k, v in cfg.to_dict()["model"].items()}
    with open(os.path.join(output, "config.yaml"), "w") as f:
        f.write(f"# converted from {os.path.abspath(hf_dir)} by tools/convert_from_hf.py\n")
        yaml.safe_dump({"model": fields, "data": {"tokenizer_model": tokenizer}}, f, sort_keys=False)
    return {"output": output, "tag": tag, "parameters": sum(t.numel() for k, t in sd.items() if k != "output.weight"
                                                           or not model.tie_embeddings),
            "dtype": sorted({str(t.dtype) for t in sd.values()}), "tokenizer": tokenizer or None}
