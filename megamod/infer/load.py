"""The Python API to a trained model: its weights as the single-device model, and its tokenizer.

    import megamod
    model, cfg = megamod.load_model("runs/demo")            # newest complete checkpoint, eval mode
    tok = megamod.load_tokenizer("runs/demo")               # the run's --data.tokenizer_model

Any complete checkpoint loads, whatever grid wrote it (TP, PP, DP, ZeRO 0-3) or a weights-only one
(tools/convert_from_hf.py): ``consolidated_state_dict`` (megamod/train/checkpoint.py) assembles the
full tensors, loaded with ``strict=True``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megamod.config import Config, build_config
from megamod.data.tokenizer import Tokenizer
from megamod.model.gpt import GPT, build_model
from megamod.train.checkpoint import consolidated_state_dict, read_meta, resolve_checkpoint


def load_state(run_dir: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(full state dict, the run's config as saved, "ckpt_dir/tag") of a complete checkpoint.
    ``run_dir``: a run directory, its checkpoints/ directory, or a step_* directory."""
    ckpt_dir, tag = resolve_checkpoint(run_dir, tag)
    raw = read_meta(ckpt_dir, tag)["config"]
    return consolidated_state_dict(ckpt_dir, tag), raw, os.path.join(ckpt_dir, tag)


def load_model(run_dir: str, tag: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[GPT, Config]:
    """The checkpoint as the single-device model on ``device``, in eval mode, and its Config."""
    sd, raw, _ = load_state(run_dir, tag)
    cfg = build_config(raw)
    model = build_model(cfg, device=device)
    model.load_state_dict(sd, strict=True)
    return model.to(dtype).eval(), cfg


def load_tokenizer(run_dir: str, tag: str | None = None, tokenizer_model: str | None = None) -> Tokenizer:
    """The run's sentencepiece tokenizer (its --data.tokenizer_model, or ``tokenizer_model``)."""
    ckpt_dir, tag = resolve_checkpoint(run_dir, tag)
    path = tokenizer_model or read_meta(ckpt_dir, tag)["config"].get("data", {}).get("tokenizer_model", "")
    if not path:
        raise FileNotFoundError(f"{ckpt_dir}/{tag}: the run has no --data.tokenizer_model; pass tokenizer_model=")
    if not os.path.isfile(path):  # relative to where training ran, or a moved run: try the run directory
        alt = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), os.path.basename(path))
        path = alt if os.path.isfile(alt) else path
    return Tokenizer(path)
