"""The real ``Trainer`` inside a ``run_distributed`` body: build it for a config's grid, step it."""

from __future__ import annotations


def build_trainer(rank: int, world_size: int, cfg):
    """A Trainer on CPU for ``cfg``'s tp × cp × pp grid, dp = the rest of the world."""
    import torch

    from megamod.parallel.dims import ParallelDims
    from megamod.train.trainer import Trainer

    p = cfg.parallel
    dims = ParallelDims(tp=p.tp, cp=p.cp, dp=world_size // (p.tp * p.cp * p.pp), pp=p.pp, rank=rank)
    dims.build_groups()
    return Trainer.build(cfg, dims, torch.device("cpu"))


def batches_of(trainer):
    """This rank's micro-batches, from where the trainer's state says training stands."""
    from megamod.train.data import micro_batches

    t, d = trainer.cfg.train, trainer.dims
    return micro_batches(trainer.train_data, t.micro_batch_size, d.coords()["dp"], d.dp, trainer.state.consumed_samples)


def train_steps(trainer, n: int) -> list[tuple[float, float]]:
    """(loss reduced as the trainer logs it, global grad norm) for the next n optimizer steps."""
    batches = batches_of(trainer)
    out = []
    for _ in range(n):
        loss = trainer.train_step(batches)
        out.append((trainer._dp_mean(loss), float(trainer.engine.get_global_grad_norm())))
    return out
