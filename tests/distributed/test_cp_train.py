"""Context parallelism in the full grid == training one device, and checkpoints across cp degrees.

Gloo runs of the real ``Trainer``, fp32, 10 optimizer steps of global batch 4 (micro-batch 2),
seq 32, a 2-block model, each grid twice: dense attention, and MoBA (block 4, topk 3: each
32-token sequence has 8 blocks and a query picks up to two past ones) with the last block kept
dense (hybrid, so both CP attention kinds run):

- 2 ranks: cp 2 (ZeRO-1); cp 2 at ZeRO-0 with activation checkpointing and torch.compile; cp 2
  with the chunked loss (train.loss_chunk_tokens); and
  cp 2 through the real loop, saving at step 5;
- 4 ranks: cp 4 (ZeRO-1), tp 2 × cp 2 with sequence parallelism (ZeRO-1), cp 2 × dp 2 (ZeRO-2),
  cp 2 × pp 2 (ZeRO-1); then the cp 2 checkpoint resumed at cp 4;
- 8 ranks: tp 2 × cp 2 × pp 2 (sequence parallel, ZeRO-1);
- 1 rank: the references, and the cp 2 checkpoint resumed at cp 1.

Every run clips (grad_clip 0.5 is below the norm), so the global norm shapes each update.
Tolerance: losses 1e-5 relative, gradient norms 5e-5 (the pipeline tests' bounds, derived there:
the runs differ from one device only in fp32 summation order, ~1e-7 in the loss; a token missing
from the loss, a gradient of a gathered key not returned to its owner, or a CP rank's share
counted twice is O(1e-2) at the first step already).
"""

from __future__ import annotations

import os

import pytest

from _harness import run_distributed
from _trainers import build_trainer, train_steps

STEPS, SAVE_AT = 10, 5
GLOBAL_BATCH, MICRO = 4, 2
MOBA = ["--model.attention", "moba", "--moba.chunk_size", "4", "--moba.topk", "3",
        "--moba.full_attention_layers", "-1"]
KINDS = {"dense": [], "moba": MOBA}
SP = ["--parallel.sequence_parallel", "true"]
# label -> (tp, cp, pp, zero stage, extra); dp = world / (tp·cp·pp)
TWO = {"cp2": (1, 2, 1, 1, []),
       # ZeRO-0 (ClippingAdamW clips after DeepSpeed's all-reduce over dp·cp), activation
       # checkpointing (the CP forward and its collectives run again inside backward) and torch.compile
       "cp2_z0_ac_compile": (1, 2, 1, 0, ["--train.activation_checkpointing", "true", "--train.compile", "true"]),
       # the chunked loss: 32 local tokens of micro-batch 2 in chunks of 12 (the last one short)
       "cp2_chunked_loss": (1, 2, 1, 1, ["--train.loss_chunk_tokens", "12"])}
FOUR = {"cp4": (1, 4, 1, 1, []), "tp2_cp2_sp": (2, 2, 1, 1, SP), "cp2_dp2_z2": (1, 2, 1, 2, []),
        "cp2_pp2": (1, 2, 2, 1, [])}
EIGHT = {"tp2_cp2_pp2_sp": (2, 2, 2, 1, SP)}


def _cfg(run_dir: str, tp: int, cp: int, pp: int, dp: int, zero: int, *extra: str):
    from megamod.config import load_config

    return load_config(None, [
        "--data.synthetic", "true", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
        "--model.n_kv_heads", "2", "--model.ffn_hidden", "128", "--model.vocab_size", "256",
        "--train.seq_len", "32", "--train.micro_batch_size", str(MICRO),
        "--train.grad_accum", str(GLOBAL_BATCH // (MICRO * dp)), "--train.steps", str(STEPS),
        "--optim.warmup_steps", "3", "--optim.grad_clip", "0.5", "--optim.zero_stage", str(zero),
        "--parallel.tp", str(tp), "--parallel.cp", str(cp), "--parallel.pp", str(pp), "--train.run_dir", run_dir,
        "--train.eval_interval", "0", "--train.log_interval", "1", "--train.eval_steps", "2",
        "--logging.tensorboard", "false", "--train.progress", "off", *extra])


def _run_grids(rank: int, world_size: int, tmp: str, grids: dict) -> dict:
    out: dict = {}
    for label, (tp, cp, pp, zero, extra) in grids.items():
        for kind, flags in KINDS.items():
            dp = world_size // (tp * cp * pp)
            cfg = _cfg(os.path.join(tmp, f"{label}_{kind}"), tp, cp, pp, dp, zero, "--checkpoint.resume", "false",
                       *extra, *flags)
            trainer = build_trainer(rank, world_size, cfg)
            out[(label, kind)] = train_steps(trainer, STEPS)
            if rank == 0:
                out[(label, kind, "metrics")] = trainer.model.layers["0"].attention.inner.log_metrics()
    return out


def _ckpt_run(rank: int, world_size: int, tmp: str) -> dict:
    """cp 2, MoBA: the real loop to step 5 (saves), then its next two steps resumed at cp 2."""
    out = _run_grids(rank, world_size, tmp, TWO)
    run = os.path.join(tmp, "cp2_ckpt")
    build_trainer(rank, world_size, _cfg(run, 1, 2, 1, 1, 1, "--train.exit_at_step", str(SAVE_AT), *MOBA)).train()
    return out


def _resume(rank: int, world_size: int, tmp: str, cp: int) -> tuple[int, list]:
    trainer = build_trainer(rank, world_size, _cfg(os.path.join(tmp, "cp2_ckpt"), 1, cp, 1, world_size // cp, 1, *MOBA))
    return trainer.state.step, train_steps(trainer, 2)


def _four(rank: int, world_size: int, tmp: str) -> dict:
    out = _run_grids(rank, world_size, tmp, FOUR)
    out["resumed_cp4"] = _resume(rank, world_size, tmp, 4)
    return out


def _one(rank: int, world_size: int, tmp: str) -> dict:
    out = {("ref", kind): train_steps(build_trainer(rank, 1, _cfg(os.path.join(tmp, f"ref_{kind}"), 1, 1, 1, 1, 1,
                                                         "--checkpoint.resume", "false", *flags)), STEPS)
           for kind, flags in KINDS.items()}
    out["resumed_cp1"] = _resume(rank, 1, tmp, 1)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("cp_train"))
    two = run_distributed(_ckpt_run, 2, tmp, timeout=600)
    four = run_distributed(_four, 4, tmp, timeout=900)
    eight = run_distributed(_run_grids, 8, tmp, EIGHT, timeout=900)
    one = run_distributed(_one, 1, tmp, timeout=300)[0]
    return {"two": two, "four": four, "eight": eight, "one": one}


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


GRIDS = [("two", k) for k in TWO] + [("four", k) for k in FOUR] + [("eight", k) for k in EIGHT]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("world, label", GRIDS, ids=[k for _, k in GRIDS])
def test_loss_curve_matches_one_device(runs, world, label, kind):
    ref = runs["one"][("ref", kind)]
    for rank_out in runs[world]:  # every rank reports the same reduced loss
        got = rank_out[(label, kind)]
        assert len(got) == STEPS
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref), start=1):
            assert _close(loss, ref_loss), (step, loss, ref_loss)
            assert _close(norm, ref_norm, 5e-5), (step, norm, ref_norm)
            assert norm > 0.5  # clipping was active
    assert ref[-1][0] < ref[0][0]  # and it trains
    metrics = runs[world][0][(label, kind, "metrics")]
    assert metrics["cp_bytes_k"] > 0 and metrics["cp_work"] > 0  # block 0 ran the CP attention of its kind
    assert ("cp_bytes_means" in metrics) == (kind == "moba")


def test_cp2_checkpoint_resumes_at_cp1_and_cp4(runs):
    ref = runs["one"][("ref", "moba")]
    for step, got in (runs["one"]["resumed_cp1"], runs["four"][0]["resumed_cp4"]):
        assert step == SAVE_AT
        for (loss, norm), (ref_loss, ref_norm) in zip(got, ref[SAVE_AT:SAVE_AT + 2]):
            assert _close(loss, ref_loss), (loss, ref_loss)
            assert _close(norm, ref_norm, 5e-5), (norm, ref_norm)
