"""A non-finite loss or gradient on one rank skips the optimizer step on every rank, leaving the
weights and the optimizer state bit for bit as they were, on every optimizer path the engine
builds; K skips in a row stop the run; the skips are counted in TensorBoard.

One gloo run of 2 ranks drives the real ``Trainer`` (DeepSpeed engine, ZeRO, our optimizers) for
7 steps per engine path: at step 3 rank 0's (under PP: the last stage's) loss *value* is NaN
while its gradients stay finite (only the step guard catches that one), at step 5 rank 1's loss
is NaN (and so are its gradients), at step 7 one element of rank 0's embedding gradient is. Each
rank snapshots every tensor of the module's and the optimizer's state dict (master weights,
moments, step counts: the partitions this rank holds) before and after each of these steps:
equal with ``torch.equal`` (bit-identical), while step 6 changes them (so the comparison could
fail). Paths: ZeRO 0 (ClippingAdamW; bf16 autocast steps the same optimizer), ZeRO 2 in fp32
(DeepSpeed's ZeRO optimizer; ZeRO 1 fp32 is the same class without gradient partitioning),
bf16 at ZeRO 1 (DeepSpeed's BF16_Optimizer) and at ZeRO 2 (the ZeRO optimizer's bf16 overflow
check), and pp=2 at ZeRO 1 (the guard wraps the last stage's loss). MasterAdamW (one rank)
skips by the same norm rule; tests/unit/test_master_adamw.py holds it to that.

Then the real training loop (log interval 1, TensorBoard on, max_consecutive_skips 3): NaN
losses at step 2 and at steps 5, 6, 7 (rank 1) stop the run at step 7 with TooManySkips on both
ranks, and TensorBoard's train/skipped_steps reads 0, 1, 1, 1 for steps 1-4 and 2, 3 for 5-6.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from _harness import run_distributed  # noqa: E402

PATHS = {  # name -> config flags
    "zero0_fp32": ["--optim.zero_stage", "0"],
    "zero1_bf16": ["--optim.zero_stage", "1", "--train.dtype", "bf16"],
    "zero2_fp32": ["--optim.zero_stage", "2"],
    "zero2_bf16": ["--optim.zero_stage", "2", "--train.dtype", "bf16"],
    "pp2_zero1": ["--optim.zero_stage", "1", "--parallel.pp", "2", "--train.grad_accum", "2"],
}


def _cfg(run_dir: str, *extra: str):
    from megamod.config import load_config

    return load_config(None, [
        "--data.synthetic", "true", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
        "--model.n_kv_heads", "4", "--model.ffn_hidden", "128", "--model.vocab_size", "256",
        "--train.seq_len", "32", "--train.micro_batch_size", "2", "--train.steps", "8", "--optim.warmup_steps", "2",
        "--train.run_dir", run_dir, "--train.eval_interval", "0", "--train.log_interval", "1",
        "--train.progress", "off", "--checkpoint.resume", "false", "--checkpoint.save_at_end", "false", *extra])


def _trainer(rank: int, world_size: int, cfg):
    from megamod.parallel.dims import ParallelDims
    from megamod.train.trainer import Trainer

    p = cfg.parallel
    dims = ParallelDims(tp=1, cp=1, dp=world_size // p.pp, pp=p.pp, rank=rank)
    dims.build_groups()
    return Trainer.build(cfg, dims, torch.device("cpu"))


def _inject(trainer, rank: int, nan_loss: dict[int, int], nan_grad: dict[int, int],
            nan_value: dict[int, int] | None = None) -> None:
    """At a step, on the rank the dict names: a NaN loss (``nan_loss``), a NaN loss value whose
    gradient is finite (``nan_value``: a constant added), a NaN in one element of the embedding's
    gradient (``nan_grad``; ranks that hold the embedding: stage 0)."""
    def loss_fn(*args, _inner=trainer.loss_fn):
        loss = _inner(*args)
        step = trainer.state.step + 1  # the step being computed
        if torch.is_grad_enabled() and nan_loss.get(step) == rank:
            loss = loss * float("nan")
        if torch.is_grad_enabled() and (nan_value or {}).get(step) == rank:
            loss = loss + torch.tensor(float("nan"))
        return loss

    trainer.loss_fn = loss_fn
    if trainer.pipeline is not None:
        trainer.pipeline.loss_fn = loss_fn
    emb = trainer.model.tok_embeddings
    if emb is not None:
        def poison(g):
            if nan_grad.get(trainer.state.step + 1) == rank:
                g = g.clone()
                g.view(-1)[0] = float("nan")
            return g

        emb.weight.register_hook(poison)


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def walk(obj, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            out[path] = obj.detach().clone()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")

    walk(trainer.engine.module.state_dict(), "module")
    walk(trainer.engine.optimizer.state_dict(), "optimizer")
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ (bitwise), or that exist on one side only."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def _body(rank: int, world_size: int, tmp: str) -> dict:
    from megamod.train.data import micro_batches
    from megamod.train.guard import TooManySkips

    out: dict = {}
    for name, flags in PATHS.items():
        trainer = _trainer(rank, world_size, _cfg(os.path.join(tmp, name), *flags))
        losing = 1 if trainer.pipeline is not None else 0  # under PP only the last stage has a loss
        _inject(trainer, rank, nan_loss={5: 1}, nan_grad={7: 0}, nan_value={3: losing})
        t, d = trainer.cfg.train, trainer.dims
        batches = micro_batches(trainer.train_data, t.micro_batch_size, d.coords()["dp"], d.dp, 0)
        snaps, losses = {}, []
        for step in range(1, 8):
            if step in (3, 5, 7):
                snaps[f"before{step}"] = _snapshot(trainer)
            losses.append(trainer._dp_mean(trainer.train_step(batches)))
            snaps[f"after{step}"] = _snapshot(trainer)
        out[name] = {"skip3": _same(snaps["before3"], snaps["after3"]),
                     "skip5": _same(snaps["before5"], snaps["after5"]),
                     "skip7": _same(snaps["before7"], snaps["after7"]),
                     "step6_changed": len(_same(snaps["after5"], snaps["after6"])),
                     "tensors": len(snaps["after5"]), "skipped": trainer.guard.check(7), "losses": losses,
                     "ds_skipped": int(getattr(trainer.engine, "skipped_steps", 0))}
    # The real loop: a lone skip, then three in a row stop the run (every rank, same step).
    trainer = _trainer(rank, world_size, _cfg(os.path.join(tmp, "loop"), "--train.max_consecutive_skips", "3"))
    _inject(trainer, rank, nan_loss={2: 1, 5: 1, 6: 1, 7: 1}, nan_grad={})
    try:
        trainer.train()
        out["loop"] = "finished"
    except TooManySkips as e:
        out["loop"] = (trainer.state.step, str(e))
    return out


def _tensorboard(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    values = {}
    for f in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag == tag:
                    values[event.step] = v.simple_value
    return values


def test_nonfinite_steps_are_skipped_bit_exactly_on_every_engine_path(tmp_path):
    results = run_distributed(_body, 2, str(tmp_path))
    for rank, res in enumerate(results):
        for name in PATHS:
            r = res[name]
            assert r["tensors"] > 10, (rank, name)  # weights, and the optimizer's state, were compared
            assert r["skip3"] == [], (rank, name, "step 3 (NaN loss value on rank 0) changed", r["skip3"][:5])
            assert r["skip5"] == [], (rank, name, "step 5 (NaN loss on rank 1) changed", r["skip5"][:5])
            assert r["skip7"] == [], (rank, name, "step 7 (NaN gradient on rank 0) changed", r["skip7"][:5])
            assert r["step6_changed"] > 0, (rank, name, "step 6 changed nothing: the comparison is vacuous")
            assert r["skipped"] == 3, (rank, name, r["skipped"])
            assert torch.isfinite(torch.tensor(r["losses"][5])), (rank, name, r["losses"])  # step 6 trains again
            if not name.startswith("zero0"):  # DeepSpeed's own count agrees where DeepSpeed decides
                assert r["ds_skipped"] == 3, (rank, name, r["ds_skipped"])
        step, message = res["loop"]
        assert step == 7 and "3 optimizer steps in a row were skipped" in message, res["loop"]
        assert "--train.max_consecutive_skips 3" in message
    counts = _tensorboard(tmp_path / "loop", "train/skipped_steps")
    assert counts == {1: 0, 2: 1, 3: 1, 4: 1, 5: 2, 6: 3}, counts  # step 7 stops before it is logged
