"""Pipeline parallelism (1F1B, one DeepSpeed engine per stage) == training one device.

Gloo runs of the real ``Trainer`` on a 4-block model with tied input/output embeddings (the
shared matrix lives on the first and the last stage), fp32, global batch 8 per step:

- 4 ranks: pp=4 (ZeRO-2), pp=2 × dp=2 (ZeRO-1), tp=2 × pp=2 (ZeRO-2, sequence parallel), and a
  MoD model (routed blocks 1 and 3, router BCE + predictor losses on) at pp=2 × dp=2 and at
  tp=2 × pp=2 with sequence parallelism (routing over the gathered logits, routed_sp.py);
  each 10 steps. Then each grid again for one step at ZeRO-0, whose engines keep every
  gradient whole in ``.grad`` at the accumulation boundary, to compare gradients.
- 8 ranks: tp=2 × pp=2 × dp=2 at ZeRO-0 (where ClippingAdamW computes the clipping norm over
  TP × PP itself, replicated parameters counted once), 10 steps, and its gradients.
- 2 ranks: pp=2 (ZeRO-2) through the real loop, exiting and saving at step 5, then resumed on
  the same grid for two steps.
- 1 rank: the references (micro-batch 2 × grad_accum 4), and the pp=2 checkpoint resumed at pp=1.

The 1F1B schedule needs grad_accum ≥ 1 micro-batches and runs any number; 4 micro-batches per
step fill a pp=4 pipeline. Every run clips (grad_clip 0.5 is below the gradient norm here), so the
global norm over all stages decides each update: a stage missing from the norm, or the tied
matrix counted twice, shows in the loss from step 2 on.

Tolerances: losses 1e-5 relative, gradient norms 5e-5, gradients 1e-5 of the parameter's
largest gradient entry. The runs differ from the reference only in fp32 summation order (DP and
TP reductions, ZeRO's reduce-scatter, the tied gradient added as a sum of two parts): ~1e-7 in
the losses; the norms drift further (measured: up to 1.3e-5 at step 5, and the same 1.2e-5 for
tp=2 or tp=4 without any pipeline), because Adam's division by sqrt(v) turns the sum-order noise
of near-zero gradient entries into O(lr) weight differences. A schedule bug (a micro-batch's
gradient missing or applied twice, a stage out of step) is O(1e-1).
"""

from __future__ import annotations

import os

import pytest
import torch

from _harness import run_distributed
from _trainers import batches_of, build_trainer, train_steps

STEPS, SAVE_AT = 10, 5
GLOBAL_BATCH, MICRO = 8, 2
MOD = ["--mod.enabled", "true", "--mod.every", "2", "--mod.capacity", "0.25", "--mod.aux_loss_weight", "0.1",
       "--mod.predictor", "true"]
# label -> (tp, pp, zero stage, extra flags); dp = world / (tp·pp)
FOUR = {"pp4": (1, 4, 2, []), "pp2_dp2": (1, 2, 1, []), "tp2_pp2_sp": (2, 2, 2, ["--parallel.sequence_parallel", "true"]),
        "mod_pp2_dp2": (1, 2, 1, MOD), "mod_tp2_pp2_sp": (2, 2, 2, [*MOD, "--parallel.sequence_parallel", "true"])}
EIGHT = {"tp2_pp2_dp2": (2, 2, 0, [])}  # ZeRO-0: the optimizer clips, its norm reduced over TP × PP
EXPORTED = {"tp2_pp2_sp"}  # saved after the 10 steps, and after the ZeRO-0 step: exported to HF below


def _cfg(run_dir: str, tp: int, pp: int, dp: int, zero: int, *extra: str):
    from megamod.config import load_config

    return load_config(None, [
        "--data.synthetic", "true", "--model.n_layers", "4", "--model.d_model", "64", "--model.n_heads", "4",
        "--model.n_kv_heads", "4", "--model.ffn_hidden", "128", "--model.vocab_size", "256",
        "--model.tie_embeddings", "true", "--train.seq_len", "32", "--train.micro_batch_size", str(MICRO),
        "--train.grad_accum", str(GLOBAL_BATCH // (MICRO * dp)), "--train.steps", str(STEPS),
        "--optim.warmup_steps", "3", "--optim.grad_clip", "0.5", "--optim.zero_stage", str(zero),
        "--parallel.tp", str(tp), "--parallel.pp", str(pp), "--train.run_dir", run_dir,
        "--train.eval_interval", "0", "--train.log_interval", "1", "--train.eval_steps", "2",
        "--logging.tensorboard", "false", "--train.progress", "off", *extra])


def _first_step_grads(trainer) -> dict:
    """Gradients of this rank's parameters at the first accumulation boundary (ZeRO-0: whole and
    DP-averaged in ``.grad``), keyed by name; TP shards with their (dim, tp rank, tp)."""
    from megamod.parallel.tensor import shard_dims

    engine, grads = trainer.engine, {}
    dims = shard_dims(trainer.model)
    step = engine.step

    def capture(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary() and not grads:
            for name, p in trainer.model.named_parameters():
                if p.grad is not None and not getattr(p, "pipeline_tied_copy", False):
                    grads[name] = (p.grad.detach().clone(), dims.get(name), trainer.dims.coords()["tp"], trainer.dims.tp)
        return step(*args, **kwargs)

    engine.step = capture
    trainer.train_step(batches_of(trainer))
    return grads


def _run_grids(rank: int, world_size: int, tmp: str, grids: dict) -> dict:
    from megamod.parallel.tensor import shard_dims

    out: dict = {}
    for label, (tp, pp, zero, extra) in grids.items():
        dp = world_size // (tp * pp)
        cfg = _cfg(os.path.join(tmp, label), tp, pp, dp, zero, "--checkpoint.resume", "false", *extra)
        trainer = build_trainer(rank, world_size, cfg)
        out[label] = train_steps(trainer, STEPS)
        if label in EXPORTED:
            trainer.save()
        cfg0 = _cfg(os.path.join(tmp, label + "_z0"), tp, pp, dp, 0, "--checkpoint.resume", "false", *extra)
        trainer0 = build_trainer(rank, world_size, cfg0)
        out[(label, "grads")] = _first_step_grads(trainer0)
        if label in EXPORTED:  # a ZeRO-0 checkpoint: one module file per TP rank and stage
            trainer0.save()
            dims = shard_dims(trainer0.model)
            out[(label, "z0_params")] = {n: (p.detach().clone(), dims.get(n), trainer0.dims.coords()["tp"], tp)
                                         for n, p in trainer0.model.named_parameters()
                                         if not getattr(p, "pipeline_tied_copy", False)}
    return out


def _two_ranks(rank: int, world_size: int, tmp: str) -> dict:
    run = os.path.join(tmp, "pp2_ckpt")
    build_trainer(rank, world_size, _cfg(run, 1, 2, 1, 2, "--train.exit_at_step", str(SAVE_AT))).train()
    trainer = build_trainer(rank, world_size, _cfg(run, 1, 2, 1, 2))
    return {"resumed_pp2": (trainer.state.step, train_steps(trainer, 2)),
            "stage_dirs": sorted(d for d in os.listdir(os.path.join(run, "checkpoints", f"step_{SAVE_AT:08d}"))
                                 if d.startswith("pp_stage"))}


def _one_rank(rank: int, world_size: int, tmp: str) -> dict:
    import torch

    from megamod.train.checkpoint import consolidated_state_dict

    out: dict = {}
    out["ref"] = train_steps(build_trainer(rank, 1, _cfg(os.path.join(tmp, "ref"), 1, 1, 1, 1, "--checkpoint.resume", "false")),
                        STEPS)
    out["ref_mod"] = train_steps(build_trainer(rank, 1, _cfg(os.path.join(tmp, "ref_mod"), 1, 1, 1, 1,
                                                   "--checkpoint.resume", "false", *MOD)), STEPS)
    for label, extra in (("ref", []), ("ref_mod", MOD)):
        cfg0 = _cfg(os.path.join(tmp, label + "_z0"), 1, 1, 1, 0, "--checkpoint.resume", "false", *extra)
        out[(label, "grads")] = _first_step_grads(build_trainer(rank, 1, cfg0))
    # The pp=2 ZeRO-2 run's step-5 checkpoint, resumed on one rank (pp=1): weights, Adam moments,
    # LR schedule and step counters all come back through the merged universal checkpoint.
    run = os.path.join(tmp, "pp2_ckpt")
    trainer = build_trainer(rank, 1, _cfg(run, 1, 1, 1, 2))
    export = consolidated_state_dict(os.path.join(run, "checkpoints"))
    out["export_matches"] = all(torch.equal(export[n], p) for n, p in trainer.model.state_dict().items())
    out["resumed_pp1"] = (trainer.state.step, train_steps(trainer, 2))
    out.update(_tp2_pp2_export(rank, tmp))
    return out


def _tp2_pp2_export(rank: int, tmp: str) -> dict:
    """The tp=2 × pp=2 (ZeRO-2, SP) run's step-10 checkpoint exported to HF as it is, and after
    resuming it on one rank (DeepSpeed's universal checkpoint reshards it to tp=1, pp=1) and
    saving there: the files of both exports, byte for byte. And load_model's view of the tp2 ×
    pp2 checkpoint, next to the resharded model's weights; and the ZeRO-0 checkpoint's."""
    import shutil

    import torch

    from megamod.infer.hf_export import export
    from megamod.infer.load import load_model, load_state

    src = os.path.join(tmp, "tp2_pp2_sp")
    copy = os.path.join(tmp, "tp2_pp2_resumed_at_tp1")
    shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(copy, "checkpoints"))
    trainer = build_trainer(rank, 1, _cfg(copy, 1, 1, 1, 2))  # resumes step 10 on the other grid
    trainer.cfg.train.run_dir = os.path.join(tmp, "resaved_tp1")  # its own checkpoint, written at tp=1
    trainer.save()
    files = {}
    for name, run in (("tp2_pp2", src), ("tp1", os.path.join(tmp, "resaved_tp1"))):
        sd, raw, _ = load_state(run)
        assert raw["parallel"]["tp"] == (2 if name == "tp2_pp2" else 1)
        out_dir = os.path.join(tmp, "hf_" + name)
        export(sd, raw, out_dir, max_shard_bytes=100_000, verify=False)
        files[name] = {f: open(os.path.join(out_dir, f), "rb").read() for f in sorted(os.listdir(out_dir))}
    loaded, _ = load_model(src)
    z0 = load_state(os.path.join(tmp, "tp2_pp2_sp_z0"))[0]
    return {"hf_files": files, "resumed_step": trainer.state.step, "z0_state": z0,
            "load_model_matches": all(torch.equal(loaded.state_dict()[n], p) for n, p in trainer.model.state_dict().items())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("pp_train"))
    four = run_distributed(_run_grids, 4, tmp, FOUR, timeout=900)
    eight = run_distributed(_run_grids, 8, tmp, EIGHT, timeout=900)
    two = run_distributed(_two_ranks, 2, tmp, timeout=300)
    one = run_distributed(_one_rank, 1, tmp, timeout=300)[0]
    return {"four": four, "eight": eight, "two": two, "one": one}


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


def _ref_label(label: str) -> str:
    return "ref_mod" if label.startswith("mod") else "ref"


GRIDS = [("four", k) for k in FOUR] + [("eight", k) for k in EIGHT]


@pytest.mark.parametrize("world, label", GRIDS, ids=[k for _, k in GRIDS])
def test_loss_curve_matches_one_device(runs, world, label):
    ref = runs["one"][_ref_label(label)]
    for rank_out in runs[world]:  # every rank reports the same (DP- and pipeline-reduced) loss
        got = rank_out[label]
        assert len(got) == STEPS
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref), start=1):
            assert _close(loss, ref_loss), (step, loss, ref_loss)
            assert _close(norm, ref_norm, 5e-5), (step, norm, ref_norm)
            assert norm > 0.5  # clipping was active, so the norm shaped the update
        # Step 1 runs on identical weights: only summation order differs (measured: 0 to 1e-7), so
        # a parameter counted twice in the norm (e.g. a TP-replicated gain, +5e-5 here) shows.
        assert _close(got[0][1], ref[0][1], 1e-6), (got[0][1], ref[0][1])
    assert ref[-1][0] < ref[0][0]  # and it trains


@pytest.mark.parametrize("world, label", GRIDS, ids=[k for _, k in GRIDS])
def test_every_gradient_matches_one_device(runs, world, label):
    from megamod.parallel.tensor import shard_tensor

    ref = runs["one"][(_ref_label(label), "grads")]
    seen = set()
    for rank_out in runs[world]:
        for name, (grad, dim, tp_rank, tp) in rank_out[(label, "grads")].items():
            expected = shard_tensor(ref[name][0], dim, tp_rank, tp)
            scale = expected.abs().max().item()
            assert scale > 0, name
            assert (grad - expected).abs().max().item() <= 1e-5 * scale, name
            seen.add(name)
    assert seen == set(ref)  # every parameter lives on some stage and was compared


def test_pp2_checkpoint_resumes_at_pp1_and_at_pp2(runs):
    uninterrupted = runs["four"][0]["pp2_dp2"]  # not the same run: check against the 1-rank reference
    ref = runs["one"]["ref"]
    assert runs["two"][0]["stage_dirs"] == ["pp_stage_00", "pp_stage_01"]
    for step, got in (runs["one"]["resumed_pp1"], runs["two"][0]["resumed_pp2"]):
        assert step == SAVE_AT
        for (loss, norm), (ref_loss, ref_norm) in zip(got, ref[SAVE_AT:SAVE_AT + 2]):
            assert _close(loss, ref_loss), (loss, ref_loss)
            assert _close(norm, ref_norm, 5e-5), (norm, ref_norm)
    assert uninterrupted[SAVE_AT][0] == pytest.approx(ref[SAVE_AT][0], rel=1e-5)
    assert runs["one"]["export_matches"]


def test_tp2_pp2_checkpoint_exports_as_the_one_resharded_to_tp1(runs):
    """Same HF files, byte for byte (config, generation config, safetensors shards, index), from
    the tp=2 × pp=2 checkpoint and from it resumed and saved at tp=1 × pp=1; load_model reads the
    tp2 × pp2 checkpoint as the resharded model's exact weights; and a tp2 × pp2 ZeRO-0
    checkpoint (module files per TP rank and stage) consolidates to every rank's exact slice."""
    from megamod.parallel.tensor import shard_tensor

    one = runs["one"]
    assert one["resumed_step"] == STEPS
    a, b = one["hf_files"]["tp2_pp2"], one["hf_files"]["tp1"]
    assert sorted(a) == sorted(b) and sum(f.endswith(".safetensors") for f in a) > 1
    assert all(a[f] == b[f] for f in a), [f for f in a if a[f] != b[f]]
    assert one["load_model_matches"]
    seen = set()
    for rank_out in runs["four"]:
        for name, (param, dim, tp_rank, tp) in rank_out[("tp2_pp2_sp", "z0_params")].items():
            assert torch.equal(shard_tensor(one["z0_state"][name], dim, tp_rank, tp), param), name
            seen.add(name)
    assert seen == set(one["z0_state"]) - {"output.weight"}  # tied: the output is the embedding
