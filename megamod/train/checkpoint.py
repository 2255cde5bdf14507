"""Checkpoints: DeepSpeed's files plus ours, and a completeness marker that makes them safe.

Layout of ``{run_dir}/checkpoints``::

    step_00000100/                      one tag per save
        mp_rank_00_model_states.pt      DeepSpeed: module weights, lr scheduler, client state
        *_optim_states.pt               DeepSpeed: ZeRO-partitioned optimizer state
        megamod_rank00003.pt            ours, one per rank: RNG states (torch, numpy, python, cuda)
        megamod_complete.json           written by rank 0 after every rank finished: step,
                                        consumed samples, FLOPs so far, config. Its presence is
                                        what makes the checkpoint "complete".
    latest                              DeepSpeed's pointer, rewritten only after the marker,
                                        so zero_to_fp32.py and load_checkpoint see complete tags.

Under pipeline parallelism each stage has its own DeepSpeed engine (parallel/pipeline.py), whose
files go one level down, ``step_00000100/pp_stage_00/mp_rank_00_model_states.pt`` and so on;
our RNG files and the marker stay at the tag's top. Parameter names are the same at every PP
degree, so a checkpoint resumes on another grid through DeepSpeed's universal checkpoint, which
reshard.py assembles from the stages.

A weights-only checkpoint (``save_weights``: tools/convert_from_hf.py writes one) is a tag with
no DeepSpeed files::

    step_00000000/
        consolidated.pt                 torch.save of {parameter name: full tensor}, the
                                        single-device model's state_dict names (a tied output
                                        weight under both names, one storage); any dtype
        megamod_complete.json           as above, plus "weights_only": true and "source"

It has no optimizer state, so it is not resumed but loaded as initial weights
(``--checkpoint.load``, ``load_initial_weights``) or read by ``consolidated_state_dict``.

A run killed mid-save leaves a tag without the marker; ``find_latest_complete`` skips it and the
next save of the same step overwrites it. Saves go through the DeepSpeed engine on every rank
(a collective); the marker is written after every rank reported its files. The marker carries a
manifest (size and CRC-32 of every file, ckpt_integrity.py) that resume verifies. A save that
fails on any rank (disk full, I/O error) is agreed on by all: the partial tag is removed,
``latest`` stays as it was and every rank raises ``CheckpointSaveError``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megamod.train.ckpt_integrity import CheckpointSaveError, SaveRecorder, verify  # noqa: F401
from megamod.train.ckpt_layout import (MARKER, engine_location, find_latest_complete, list_tags, read_meta,  # noqa: F401
                                      resolve_checkpoint, stage_dir, tag_for)
from megamod.train.reshard import convert_to_universal, full_state_dict, load_universal


class CheckpointError(RuntimeError):
    """A checkpoint this run cannot resume (damaged, or another model); the message says what to do."""


WEIGHTS = "consolidated.pt"


@dataclass
class TrainState:
    """Everything beyond DeepSpeed's files that an exact resume needs."""

    step: int = 0
    consumed_samples: int = 0
    flops: float = 0.0


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, ckpt_dir: str, state: TrainState, config: dict[str, Any], keep_last: int,
         stage: int | None = None, rank_state: dict[str, Any] | None = None, group: Any = None) -> str:
    """Collective: every rank calls it. ``stage``: this rank's pipeline stage when pp > 1;
    ``rank_state``: more of this rank's state for its own file (the step guard's); ``group``: where
    the ranks agree on the outcome (the control group). Returns the tag, or raises
    ``CheckpointSaveError`` on every rank when a write failed on any."""
    tag = tag_for(state.step)
    rank = dist.get_rank()
    path = os.path.join(ckpt_dir, tag)
    if rank == 0 and os.path.exists(os.path.join(path, MARKER)):
        os.remove(os.path.join(path, MARKER))  # re-saving a step: invalid until rewritten
    dist.barrier()
    recorder = SaveRecorder.install(engine)
    save_dir, ds_tag = engine_location(ckpt_dir, tag, stage)
    try:
        engine.save_checkpoint(save_dir, tag=ds_tag, save_latest=False)
    except Exception as e:  # noqa: BLE001  a write DeepSpeed makes outside its checkpoint engine
        recorder.errors.append(f"{type(e).__name__}: {e}")
        dist.barrier()  # the one save_checkpoint ends with, where the other ranks wait
    ours = os.path.join(path, f"megamod_rank{rank:05d}.pt")
    recorder.write(lambda: torch.save({"rng": _rng_state(), **(rank_state or {})}, ours), ours)
    report = (recorder.manifest(path), recorder.errors)
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report, group=group)  # every rank's files are on disk, or failed
    errors = [f"rank {r}: {e}" for r, (_, errs) in enumerate(reports) for e in errs]
    if errors:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # incomplete; and a full disk wants the space back
        dist.barrier()
        latest = find_latest_complete(ckpt_dir)
        raise CheckpointSaveError(f"checkpoint {path} was not saved ({errors[0]}"
                                  f"{f'; {len(errors) - 1} more' if len(errors) > 1 else ''}); the previous "
                                  f"checkpoint ({latest or 'none'}) and `latest` are unchanged")
    if rank == 0:
        meta = {"step": state.step, "consumed_samples": state.consumed_samples, "flops": state.flops,
                "world_size": dist.get_world_size(), "config": config,
                "files": {k: v for files, _ in reports for k, v in files.items()}}
        _atomic_write_text(os.path.join(path, MARKER), json.dumps(meta, indent=1))
        _atomic_write_text(os.path.join(ckpt_dir, "latest"), tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def choose_resume_tag(ckpt_dir: str, check: bool = True, fallback: bool = True, group: Any = None) -> str | None:
    """Collective (local without a process group): the newest complete tag whose files match
    their manifest (``check``), the same on every rank; None when there is no complete tag. A
    damaged newest tag is reported (rank 0) and passed over for the previous one, unless
    ``fallback`` is False: then CheckpointError."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    tags = [[t for _, t, complete in list_tags(ckpt_dir) if complete] if rank == 0 else None]
    if distributed:
        dist.broadcast_object_list(tags, src=0, group=group)  # every rank considers the same tags
    damaged = []
    for tag in tags[0]:
        problems = verify(ckpt_dir, tag, group) if check else []
        if not problems:
            return tag
        what = f"checkpoint {os.path.join(ckpt_dir, tag)} is damaged: {problems[0]}" + (
            f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        if not fallback:
            raise CheckpointError(f"{what}. Resume from the previous complete checkpoint with --checkpoint.fallback "
                                  f"true, or move the damaged one away")
        if rank == 0:
            print(f"warning: {what}; falling back to the previous complete checkpoint", flush=True)
        damaged.append(tag)
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {ckpt_dir} (damaged: {', '.join(damaged)}); start over with "
                              f"--checkpoint.resume false or a new --train.run_dir")
    return None


def _prune(ckpt_dir: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete tags; drop older ones and stale incomplete ones."""
    tags = list_tags(ckpt_dir)
    complete = [t for t in tags if t[2]]
    if not complete:
        return
    keep = {tag for _, tag, _ in complete[:max(1, keep_last)]}
    newest_step = complete[0][0]
    for step, tag, is_complete in tags:
        if tag not in keep and (is_complete or step < newest_step):
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def _grid(meta: dict[str, Any]) -> dict[str, int]:
    p = meta["config"]["parallel"]
    return {"world_size": meta["world_size"], "tp": p["tp"], "cp": p["cp"], "pp": p["pp"]}


def load(engine, ckpt_dir: str, tag: str, grid: dict[str, int] | None = None,
         stage: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Collective. Restores DeepSpeed state and ours; returns the train state to continue from and
    the ``rank_state`` this rank saved (empty for a checkpoint from before it existed).

    ``grid``: this run's degrees (``ParallelDims.sizes()``). A checkpoint written on another grid
    (TP or PP degree, or world size) is resumed through DeepSpeed's universal checkpoint
    (converted once, by rank 0; see megamod/train/reshard.py)."""
    path = os.path.join(ckpt_dir, tag)
    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    saved = _grid(meta)
    now = {**saved, **{k: v for k, v in (grid or {}).items() if k in saved}, "world_size": dist.get_world_size()}
    rank = dist.get_rank()
    if saved == now:
        load_path, _ = engine.load_checkpoint(*engine_location(ckpt_dir, tag, stage))
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        rng_rank = rank
    else:
        _reshard_load(engine, ckpt_dir, tag, saved, now, meta)
        rng_rank = 0  # every rank's default RNG stream is the same (one seed, same draws); take rank 0's
    ours = torch.load(os.path.join(path, f"megamod_rank{rng_rank:05d}.pt"), weights_only=False)
    if "rng" in ours:
        rng, rank_state = ours.pop("rng"), ours
    else:  # written before rank_state existed: the RNG states alone
        rng, rank_state = ours, {}
    _set_rng_state(rng)
    return TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"], flops=meta["flops"]), rank_state


def _reshard_load(engine, ckpt_dir: str, tag: str, saved: dict[str, int], now: dict[str, int],
                  meta: dict[str, Any]) -> None:
    path = os.path.join(ckpt_dir, tag)
    zero_saved = meta["config"]["optim"]["zero_stage"]
    if zero_saved not in (1, 2) or engine.zero_optimization_stage() not in (1, 2):
        # DeepSpeed restores universal checkpoints through the ZeRO optimizer; stage 3 is untested here.
        raise RuntimeError(
            f"checkpoint {path} was written on grid {saved}, this run is {now}: resuming on another grid "
            f"needs --optim.zero_stage 1 or 2 on both sides (checkpoint: {zero_saved}, now: "
            f"{engine.zero_optimization_stage()}); or resume with the checkpoint's grid")
    err = [None]
    if dist.get_rank() == 0:
        print(f"checkpoint {path}: grid {saved} -> {now}, resharding via a DeepSpeed universal checkpoint",
              flush=True)
        try:
            convert_to_universal(ckpt_dir, tag)
        except Exception as e:  # the other ranks wait in the broadcast below: they must fail too
            err[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(err, src=0)
    if err[0] is not None:
        raise RuntimeError(f"converting {path} to a universal checkpoint failed: {err[0]}")
    load_universal(engine, ckpt_dir, tag)


def consolidated_state_dict(ckpt_dir: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full weights of a checkpoint (any TP/PP/DP degree and ZeRO stage), for the single-device
    model with ``strict=True``: fp32 for a training checkpoint, the stored dtype for a weights-only one.

    ZeRO ≥ 1 keeps the fp32 master weights partitioned in the optimizer files: DeepSpeed's
    zero_to_fp32 reassembles them, and the universal conversion merges TP slices and pipeline
    stages. Without ZeRO each TP rank's module file holds its slice (merged here by the TP plan).
    Works offline, no process group needed.
    """
    tag = tag or find_latest_complete(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir} (a step_* dir with {MARKER})")
    meta = read_meta(ckpt_dir, tag)
    if meta.get("weights_only"):
        return torch.load(os.path.join(ckpt_dir, tag, WEIGHTS), map_location="cpu", weights_only=True)
    config = meta["config"]
    tp, pp, zero = config["parallel"]["tp"], config["parallel"]["pp"], config["optim"]["zero_stage"]
    if zero == 0:
        # Without ZeRO each stage's module files hold its weights (names as on one device), one
        # file per TP rank (DeepSpeed names them by model-parallel rank = TP rank).
        dirs = [os.path.join(ckpt_dir, tag)] if pp == 1 else [os.path.join(ckpt_dir, tag, stage_dir(s))
                                                              for s in range(pp)]
        out: dict[str, torch.Tensor] = {}
        for d in dirs:
            states = [torch.load(os.path.join(d, f"mp_rank_{r:02d}_model_states.pt"), weights_only=False)
                      for r in range(tp)]
            out.update(_merge_tp(({k: v.float() for k, v in st["module"].items()} for st in states), config)
                       if tp > 1 else {k: v.float() for k, v in states[0]["module"].items()})
            out.update(_master_weights(states[0].get("optimizer")))
        if config["model"]["tie_embeddings"] and "output.weight" in out:
            out["output.weight"] = out["tok_embeddings.weight"]
        return out
    if tp > 1 or pp > 1:
        # TP slices and pipeline stages are merged by the universal conversion
        # (megamod/train/reshard.py, cached in the tag).
        sd = full_state_dict(ckpt_dir, tag)
        if config["model"]["tie_embeddings"]:
            sd["output.weight"] = sd["tok_embeddings.weight"]
        return sd
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag))


def _merge_tp(shards, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """TP ranks' module states -> full tensors, by the TP plan (``shard_dims`` of the model):
    split ones concatenate on their dim, replicated ones are taken from rank 0."""
    from megamod.config import build_config
    from megamod.model.gpt import GPT
    from megamod.parallel.tensor import shard_dims

    with torch.device("meta"):
        dims = shard_dims(GPT(build_config(config)))
    shards = list(shards)
    return {name: first if dims.get(name) is None else torch.cat([sh[name] for sh in shards], dim=dims[name])
            for name, first in shards[0].items()}


def save_weights(ckpt_dir: str, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
                 source: str = "", step: int = 0) -> str:
    """A weights-only checkpoint (layout in the module docstring), written by one process:
    tensors first, the marker last (atomically), so a killed conversion leaves no complete tag."""
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, MARKER)):
        os.remove(os.path.join(path, MARKER))
    torch.save(state_dict, os.path.join(path, WEIGHTS))
    meta = {"step": step, "consumed_samples": 0, "flops": 0.0, "world_size": 1, "config": config,
            "weights_only": True, "source": source}
    _atomic_write_text(os.path.join(path, MARKER), json.dumps(meta, indent=1))
    return tag


def load_initial_weights(model: torch.nn.Module, ckpt_dir: str, tag: str, full_names: set[str]) -> None:
    """Collective. Copy a complete checkpoint's weights (any grid, or weights-only) into this
    rank's part of the model — its pipeline stage, its TP slice (``tp_shard``) — before the
    engine exists, so the optimizer starts fresh from them. ``full_names``: the single-device
    model's state_dict keys; the checkpoint must have exactly these. Rank 0 reads first: for a
    sharded DeepSpeed checkpoint that converts it once (reshard.py); the others then read it.
    Every rank holds the full tensors on the CPU meanwhile (the model's size in the stored dtype)."""
    sd: dict[str, torch.Tensor] | None = None
    err = [None]
    if dist.get_rank() == 0:
        try:
            sd = consolidated_state_dict(ckpt_dir, tag)
            missing, extra = sorted(full_names - set(sd)), sorted(set(sd) - full_names)
            if missing or extra:
                err[0] = f"its parameters differ from this model's: missing {missing[:5]}, unexpected {extra[:5]}"
        except Exception as e:  # the other ranks wait in the broadcast below: they must fail too
            err[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(err, src=0)
    if err[0] is not None:
        raise RuntimeError(f"--checkpoint.load {ckpt_dir}/{tag}: {err[0]}")
    if sd is None:
        sd = consolidated_state_dict(ckpt_dir, tag)
    with torch.no_grad():
        for name, p in model.named_parameters():
            dim, rank, world = getattr(p, "tp_shard", (0, 0, 1))
            full = sd[name]
            p.copy_(full if world == 1 else full.chunk(world, dim=dim)[rank])
    dist.barrier()


def _master_weights(optimizer: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The fp32 master weights that MasterAdamW (train.bf16_mode master_fused) keeps in its state,
    by parameter name; the module file holds only their bf16 copies. Empty for other optimizers."""
    if not optimizer:
        return {}
    out = {}
    for group in optimizer.get("param_groups", []):
        for name, index in zip(group.get("param_names", []), group["params"]):
            state = optimizer["state"].get(index, {})
            if "master" in state:
                out[name] = state["master"]
    return out
