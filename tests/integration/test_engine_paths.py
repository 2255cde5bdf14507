"""The single-GPU fast path end to end on CPU: ZeRO 0 with ClippingAdamW (and no all-reduce at
one data-parallel rank) trains like ZeRO 1 with DeepSpeed's own clipping, and the autocast
recipe (train.dtype bf16 at ZeRO 0) trains, reports its gradient norm and resumes."""

from __future__ import annotations

import json
import math

import pytest

from conftest import read_losses  # noqa: F401  (pytest puts this dir on sys.path)


def _grad_norms(run_dir) -> dict[int, float]:
    with open(run_dir / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["grad_norm"] for r in recs if r["kind"] == "train"}


def test_zero0_optimizer_clipping_matches_deepspeed_clipping(tmp_path, train):
    """fp32, 1 rank, grad_clip 0.5 (the debug model starts with gradient norms ~3, so every step
    clips). Same data and init; the two paths differ only in where clipping happens (grads ·
    clip coefficient before a foreach AdamW, or divided by its inverse inside the fused kernel)
    and summation order: 1e-5 relative over 6 steps."""
    common = ["--train.steps", "6", "--optim.grad_clip", "0.5"]
    train(tmp_path / "z0", *common, "--optim.zero_stage", "0")
    train(tmp_path / "z1", *common, "--optim.zero_stage", "1")
    z0, z1 = read_losses(tmp_path / "z0"), read_losses(tmp_path / "z1")
    n0, n1 = _grad_norms(tmp_path / "z0"), _grad_norms(tmp_path / "z1")
    for s in range(1, 7):
        assert z0[s] == pytest.approx(z1[s], rel=1e-5), s
        assert n0[s] == pytest.approx(n1[s], rel=1e-4), s
    assert n0[1] > 0.5  # clipping was active


def test_autocast_recipe_trains_and_resumes(tmp_path, train):
    """DeepSpeed's torch_autocast on CPU (bf16 autocast, fp32 weights): the losses of the fp32
    run to bf16 rounding (synthetic tokens are uniform, so the loss stays near ln 512 = 6.24 and
    2e-3 relative is a few bf16 ulps of the logits), a gradient norm in the metrics, and an exact
    resume (fp32 state, same kernels)."""
    common = ["--train.steps", "8", "--optim.zero_stage", "0"]
    train(tmp_path / "fp32", *common)
    bf16 = ["--train.dtype", "bf16", "--train.bf16_mode", "autocast"]
    train(tmp_path / "a", *common, *bf16)
    train(tmp_path / "b", *common, *bf16, "--train.exit_at_step", "4")
    out = train(tmp_path / "b", *common, *bf16)
    assert "resumed from" in out.stdout
    ref, a, b = (read_losses(tmp_path / n) for n in ("fp32", "a", "b"))
    assert sorted(a) == list(range(1, 9)) and all(math.isfinite(v) for v in a.values())
    for s in range(1, 9):
        assert a[s] == pytest.approx(ref[s], rel=2e-3), s
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]
    assert all(math.isfinite(v) and v > 0 for v in _grad_norms(tmp_path / "a").values())


@pytest.mark.parametrize("accum", [1, 2])
def test_master_fused_recipe_trains_resumes_and_exports_master_weights(tmp_path, train, accum):
    """train.dtype bf16 on one rank at ZeRO 0 picks master_fused (bf16 weights, MasterAdamW's
    fp32 master weights; the torch update on CPU): the fp32 run's losses to bf16 rounding (as
    above), an exact resume (the optimizer state is restored and the bf16 weights are rebuilt from
    the master weights), and a consolidated checkpoint that holds the fp32 master weights, not
    their bf16 copies. With grad_accum 2 the gradients are summed in fp32 by the hooks."""
    from megamod.train.checkpoint import consolidated_state_dict

    common = ["--train.steps", "8", "--optim.zero_stage", "0", "--train.grad_accum", str(accum)]
    train(tmp_path / "fp32", *common)
    train(tmp_path / "a", *common, "--train.dtype", "bf16")
    train(tmp_path / "b", *common, "--train.dtype", "bf16", "--train.exit_at_step", "4")
    out = train(tmp_path / "b", *common, "--train.dtype", "bf16")
    assert "resumed from" in out.stdout
    ref, a, b = (read_losses(tmp_path / n) for n in ("fp32", "a", "b"))
    assert sorted(a) == list(range(1, 9))
    for s in range(1, 9):
        assert a[s] == pytest.approx(ref[s], rel=2e-3), s
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]
    assert all(math.isfinite(v) and v > 0 for v in _grad_norms(tmp_path / "a").values())

    import torch

    sd = consolidated_state_dict(str(tmp_path / "a" / "checkpoints"))
    module = torch.load(tmp_path / "a" / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    w = "layers.0.attention.wq.weight"
    assert module[w].dtype == torch.bfloat16 and sd[w].dtype == torch.float32
    assert torch.equal(sd[w].bfloat16(), module[w])  # the module holds the master weights rounded
    assert not torch.equal(sd[w], module[w].float())  # and the export has the digits bf16 drops
    assert set(sd) == set(module)
