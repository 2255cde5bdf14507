"""End-to-end trainer runs: exact resume, crash safety, data-parallel equivalence, ZeRO stages."""

from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import read_losses, run_cmd  # noqa: F401  (pytest puts this dir on sys.path)


def test_resume_is_exact(tmp_path, train):
    """20 straight steps == 10 steps, exit, resume, 10 steps (2 ranks, ZeRO-2, fp32 on CPU).

    Same ranks, same reduction order, optimizer state and LR schedule restored: bit-identical.
    """
    common = ["--train.steps", "20", "--optim.zero_stage", "2"]
    train(tmp_path / "a", *common, nproc=2)
    train(tmp_path / "b", *common, "--train.exit_at_step", "10", nproc=2)
    assert sorted(read_losses(tmp_path / "b")) == list(range(1, 11))
    out = train(tmp_path / "b", *common, nproc=2)
    assert "resumed from" in out.stdout and "step_00000010" in out.stdout
    a, b = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]


def test_killed_during_checkpoint_resumes_from_previous_complete(tmp_path, train):
    common = ["--train.steps", "15", "--checkpoint.interval", "5"]
    train(tmp_path / "ref", *common)
    run = tmp_path / "run"
    env_target = "step_00000010"
    os.environ["MEGAMOD_TEST_DIE_IN"] = env_target
    try:
        died = train(run, *common, check=False, python_args=[os.path.join(os.path.dirname(__file__), "die_in_save.py")])
    finally:
        del os.environ["MEGAMOD_TEST_DIE_IN"]
    assert died.returncode == 9, died.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert (ckpts / env_target).is_dir() and not (ckpts / env_target / "megamod_complete.json").exists()
    assert (ckpts / "latest").read_text() == "step_00000005"  # DeepSpeed's pointer never saw step 10
    out = train(run, *common)
    assert "resumed from" in out.stdout and "step_00000005" in out.stdout
    ref, got = read_losses(tmp_path / "ref"), read_losses(run)
    assert [ref[s] for s in range(6, 16)] == [got[s] for s in range(6, 16)]
    assert (ckpts / "step_00000015" / "megamod_complete.json").exists()


def test_data_parallel_and_accumulation_match_one_rank(tmp_path, train):
    """dp=2 × micro 2 (ZeRO-2) and 1 rank × micro 2 × accum 2 both equal 1 rank × micro 4.

    Same 4 samples per step in the same order; losses differ only by fp32 reduction order
    (gradient averaged over ranks / accumulated in two halves), so 1e-5 relative over 6 steps.
    """
    common = ["--train.steps", "6", "--optim.zero_stage", "2"]
    train(tmp_path / "one", *common, "--train.micro_batch_size", "4")
    train(tmp_path / "dp2", *common, "--train.micro_batch_size", "2", nproc=2)
    acc_run = train(tmp_path / "acc", *common, "--train.micro_batch_size", "2", "--train.grad_accum", "2",
                    "--checkpoint.save_at_end", "false")
    assert "no checkpoint" in acc_run.stdout and not list((tmp_path / "acc").glob("checkpoints/step_*"))
    assert list((tmp_path / "one").glob("checkpoints/step_00000006/megamod_complete.json"))  # the default saves
    one, dp2, acc = (read_losses(tmp_path / n) for n in ("one", "dp2", "acc"))
    for s in range(1, 7):
        assert dp2[s] == pytest.approx(one[s], rel=1e-5), s
        assert acc[s] == pytest.approx(one[s], rel=1e-5), s
    assert one[6] < one[1]  # it trains


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stages_train_and_consolidate(tmp_path, train, stage):
    """Every ZeRO stage trains on 2 ranks, and its checkpoint consolidates (zero_to_fp32 for
    stages ≥ 1) into a state dict the single-device model loads with strict=True."""
    from megamod.infer.load import load_model

    train(tmp_path, "--train.steps", "4", "--optim.zero_stage", str(stage), nproc=2)
    losses = read_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    model, _ = load_model(str(tmp_path))  # strict=True inside
    if stage < 3:  # stage 3 keeps only placeholders in its module files; zero_to_fp32 is the source
        saved = torch.load(tmp_path / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt",
                           weights_only=False)["module"]
        for name, p in model.state_dict().items():
            torch.testing.assert_close(p, saved[name].float(), rtol=0, atol=0, msg=name)


def test_bad_command_line_and_mismatched_resume(tmp_path, train):
    bad = run_cmd(["--model.n_layer", "3"], check=False)
    assert bad.returncode == 2 and "did you mean 'n_layers'" in bad.stderr
    train(tmp_path, "--train.steps", "2")
    out = train(tmp_path, "--train.steps", "4", "--model.d_model", "128", check=False)
    assert out.returncode != 0 and "--model.d_model (checkpoint 64, now 128)" in out.stderr


def test_moba_and_mod_moba_train(tmp_path, train):
    """A debug model trains through the real CLI with MoBA, and with MoD + MoBA (capacity 0.5: the
    routed block's compacted sequence of 16 tokens still spans 2 MoBA blocks of 8).

    "It trains" is checked as: 4 finite losses, and the final checkpoint's attention projections
    differ from the init (same seed). Loss(4) < loss(1) is not reliable here: on synthetic data at
    ~ln(512) the 4-step loss moves by noise (one MoBA run went 6.244 -> 6.268)."""
    import json

    from megamod.infer.load import load_model
    from megamod.model.gpt import build_model

    moba = ["--train.steps", "4", "--model.attention", "moba", "--moba.chunk_size", "8", "--moba.topk", "2",
            "--train.seq_len", "32"]
    for name, extra in (("moba", []), ("mod_moba", ["--mod.enabled", "true", "--mod.capacity", "0.5"])):
        train(tmp_path / name, *moba, *extra)
        losses = read_losses(tmp_path / name)
        assert sorted(losses) == [1, 2, 3, 4], name
        assert all(torch.isfinite(torch.tensor(list(losses.values())))), (name, losses)
        trained, cfg = load_model(str(tmp_path / name))
        init = build_model(cfg).state_dict()
        for i in range(2):  # both layers are MoBA (layer 1 also routed with MoD)
            for w in ("wq", "wk", "wv", "wo"):
                key = f"layers.{i}.attention.{w}.weight"
                assert not torch.equal(trained.state_dict()[key], init[key]), (name, key)
        with open(tmp_path / name / "metrics.jsonl") as f:
            first = next(r for r in map(json.loads, f) if r["kind"] == "train" and r["step"] == 1)
        margin = [k for k in first if k.endswith("attention.inner/gate_margin")]
        assert margin and all(first[k] >= 0 for k in margin), (name, sorted(first))


def test_trailing_loss_is_logged_at_evaluation(tmp_path, train):
    """--train.trailing_loss_tokens N logs val_loss_trailing, the loss on the last N positions: over
    all 32 positions it is val_loss itself (same batches, same targets: a shifted target would
    change it), over the last 8 another value."""
    import json

    def valid(run: str, n: int) -> dict:
        train(tmp_path / run, "--train.steps", "2", "--train.trailing_loss_tokens", str(n))
        with open(tmp_path / run / "metrics.jsonl") as f:
            return [r for r in map(json.loads, f) if r["kind"] == "valid"][-1]

    whole = valid("whole", 32)
    assert whole["val_loss_trailing"] == whole["val_loss"]
    last8 = valid("last8", 8)
    assert last8["val_loss"] == whole["val_loss"]  # same seed, same run
    assert last8["val_loss_trailing"] != last8["val_loss"] and math.isfinite(last8["val_loss_trailing"])


def test_pipeline_cli_trains_evaluates_and_exports(tmp_path, train):
    """The real CLI at pp=2 (torchrun, 2 ranks) on a MoD model: training losses, validation loss
    through the pipeline (forward-only schedule) and the causal-routing validation loss all equal
    the 1-rank run's within 1e-5 (fp32; only summation order differs), and generation's loader
    reads the two-stage checkpoint as the single-device model."""
    import json

    from megamod.infer.load import load_model

    common = ["--train.steps", "4", "--model.n_layers", "4", "--train.grad_accum", "2", "--train.micro_batch_size",
              "2", "--train.eval_interval", "2", "--mod.enabled", "true", "--mod.capacity", "0.5"]
    train(tmp_path / "pp1", *common)
    train(tmp_path / "pp2", *common, "--parallel.pp", "2", nproc=2)

    def valid(run: str) -> dict[int, dict]:
        with open(tmp_path / run / "metrics.jsonl") as f:
            return {r["step"]: r for r in map(json.loads, f) if r["kind"] == "valid"}

    one, two = read_losses(tmp_path / "pp1"), read_losses(tmp_path / "pp2")
    assert sorted(two) == [1, 2, 3, 4]
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-5), s
    v1, v2 = valid("pp1"), valid("pp2")
    assert sorted(v2) == [0, 2, 4]
    for s in v1:
        for key in ("val_loss", "val_loss_causal"):
            assert v2[s][key] == pytest.approx(v1[s][key], rel=1e-5), (s, key)
    model, _ = load_model(str(tmp_path / "pp2"))  # strict=True inside
    ref, _ = load_model(str(tmp_path / "pp1"))
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("zero", [0, 1])
def test_pipeline_trains_in_bf16(tmp_path, train, zero):
    """The GPU precisions through the pipeline, on CPU: bf16 weights with fp32 master weights
    (ZeRO-1) and fp32 weights under bf16 autocast (ZeRO-0, where the optimizer clips with the norm
    reduced over the stages). Tied embeddings, so the copy's gradient and weight cross stages in
    the engine's dtype. Checked: finite losses near the fp32 run's (bf16 rounding, 2e-2) and a
    finite, reported gradient norm."""
    import json

    common = ["--train.steps", "3", "--model.n_layers", "4", "--train.grad_accum", "2", "--train.micro_batch_size",
              "2", "--model.tie_embeddings", "true", "--optim.zero_stage", str(zero), "--parallel.pp", "2"]
    train(tmp_path / "fp32", *common, nproc=2)
    train(tmp_path / "bf16", *common, "--train.dtype", "bf16", nproc=2)
    ref, got = read_losses(tmp_path / "fp32"), read_losses(tmp_path / "bf16")
    assert sorted(got) == [1, 2, 3]
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=2e-2), s
    with open(tmp_path / "bf16" / "metrics.jsonl") as f:
        norms = [r["grad_norm"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert all(math.isfinite(n) and n > 0 for n in norms), norms
