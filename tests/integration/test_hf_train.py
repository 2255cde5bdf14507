"""Training continues from a converted Hugging Face Llama (tools/convert_from_hf.py + --checkpoint.load)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import BASE, read_losses  # noqa: F401  (pytest puts this dir on sys.path)


def test_training_starts_from_a_converted_hf_llama_at_tp2(tmp_path, train, load_tool):
    """An HF Llama of BASE's shape -> megamod -> ``megamod-train --checkpoint.load`` at tp=2 (2
    ranks): step 1's loss, computed on the loaded weights before any update, equals the converted
    model's loss on that micro-batch on one device (1e-5: vocab-parallel cross-entropy sums in
    another order). A run with another architecture is refused naming the flag."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megamod.config import load_config
    from megamod.infer.load import load_model
    from megamod.train.data import build_train_valid, micro_batches

    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    LlamaForCausalLM(hf).save_pretrained(str(tmp_path / "hf"))
    run = tmp_path / "converted"
    assert load_tool("convert_from_hf").main(["--hf", str(tmp_path / "hf"), "--output", str(run)]) == 0

    load = ["--config", str(run / "config.yaml"), "--checkpoint.load", str(run), "--train.steps", "1"]
    out = train(tmp_path / "ft", *load, "--parallel.tp", "2", nproc=2)
    assert "initial weights from" in out.stdout and "step_00000000" in out.stdout
    model, _ = load_model(str(run))
    cfg = load_config(None, [*BASE, "--train.steps", "1"])
    batch = next(micro_batches(build_train_valid(cfg, 1)[0], cfg.train.micro_batch_size, 0, 1, 0))
    with torch.no_grad():
        expected = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    assert read_losses(tmp_path / "ft")[1] == pytest.approx(expected, rel=1e-5)

    bad = train(tmp_path / "bad", *load, "--model.ffn_hidden", "256", check=False)
    assert bad.returncode == 2 and "--model.ffn_hidden (checkpoint 128, now 256)" in bad.stderr
    assert "Traceback" not in bad.stderr
