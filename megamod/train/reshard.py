"""Resume a checkpoint on another grid (TP or PP degree, DP size) via DeepSpeed's universal checkpoint.

    python -m megamod.train.reshard runs/x/checkpoints [--tag step_00000100]   (offline, optional)

Why DeepSpeed's, not a format of our own: measured on CPU/gloo with DeepSpeed 0.19.8 and ZeRO-2,
tp=2 × dp=2 resumed at tp=4 × dp=1, tp=1 × dp=4 and tp=1 × dp=1, the next two steps' losses and
grad norms equal the uninterrupted run's (identical to the printed digits; the test allows
1e-5), and converting the test model takes a fraction of a second.
``ds_to_universal`` merges every parameter's ZeRO fragments over DP and its slices over TP into
one full fp32 tensor plus its Adam moments; ``load_checkpoint`` with ``load_universal`` slices
them for any new (tp, dp) and re-partitions ZeRO: model, optimizer, LR schedule and step
counters, with no code of ours that mirrors DeepSpeed's private flat-buffer layout. How to merge
TP slices is in ``model.universal_checkpoint_info`` (saved in every checkpoint, derived from
``TP_PLAN``): row-parallel weights concatenate on dim 1, replicated ones are taken once (and
checked equal across TP ranks), the rest concatenate on dim 0.

Layout, next to DeepSpeed's files of the tag::

    {ckpt_dir}/{tag}/universal/
        zero/{param name}/fp32.pt, exp_avg.pt, exp_avg_sq.pt, step.pt    full (unsharded) tensors
        zero/optimizer_state.pt                                        param groups, clip, scaler
        mp_rank_XX_model_states.pt                                     copied: LR schedule, counters
    {ckpt_dir}/{tag}/latest_universal                                  DeepSpeed's pointer: "universal"

It is written once, by one process, into ``universal.tmp`` and renamed into place when
complete, so a conversion killed half-way is redone, never half-read (and pruned with its tag).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys

import torch

from megamod.train.ckpt_layout import find_latest_complete, stage_dir

UNIVERSAL = "universal"


def universal_dir(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag, UNIVERSAL)


def convert_to_universal(ckpt_dir: str, tag: str) -> str:
    """Single process (no process group needed). Idempotent: returns the existing conversion."""
    out = universal_dir(ckpt_dir, tag)
    if os.path.isdir(out):
        return out
    src = os.path.join(ckpt_dir, tag)
    if os.path.isdir(os.path.join(src, stage_dir(0))):
        return _merge_stages(ckpt_dir, tag)
    tmp = out + ".tmp"
    # DeepSpeedCheckpoint lists the tag's files recursively: a stale partial conversion inside
    # it would be read as more ranks' files.
    shutil.rmtree(tmp, ignore_errors=True)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=src, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # its progress chatter; shown only if it fails
            ds_to_universal(args)
    except BaseException:
        sys.stdout.write(log.getvalue())
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)
    with open(os.path.join(src, "latest_universal"), "w") as f:  # ds_to_universal pointed it at the tmp name
        f.write(UNIVERSAL)
    return out


def _merge_stages(ckpt_dir: str, tag: str) -> str:
    """A pipeline checkpoint (one DeepSpeed engine per stage, files in ``{tag}/pp_stage_XX``):
    convert every stage on its own — to DeepSpeed each is a whole model — and join them into one
    universal checkpoint. Parameter names are those of the single-device model at every PP
    degree and each parameter lives on one stage, so the ``zero/{name}`` folders simply add up;
    the global parts (optimizer hyper-parameters, LR schedule, step counters) are equal on every
    stage and are taken from stage 0. A name on several stages would be a bug: refused.
    The last stage's copy of a tied embedding has no optimizer state; its folder (filled from
    the module file) is left out, so the matrix comes from stage 0's ``tok_embeddings.weight``."""
    src, out = os.path.join(ckpt_dir, tag), universal_dir(ckpt_dir, tag)
    stages = sorted(d for d in os.listdir(src) if d.startswith("pp_stage_"))
    parts = [convert_to_universal(src, d) for d in stages]
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "zero"))
    owner: dict[str, str] = {}
    for stage, part in zip(stages, parts):
        zero = os.path.join(part, "zero")
        for name in sorted(os.listdir(zero)):
            if not os.path.isdir(os.path.join(zero, name)) or not os.path.isfile(os.path.join(zero, name, "exp_avg.pt")):
                continue  # optimizer_state.pt, or a parameter no optimizer owns (the tied copy)
            if name in owner:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"{src}: parameter {name} is in both {owner[name]} and {stage}")
            owner[name] = stage
            shutil.copytree(os.path.join(zero, name), os.path.join(tmp, "zero", name))
    shutil.copy2(os.path.join(parts[0], "zero", "optimizer_state.pt"), os.path.join(tmp, "zero"))
    for f in os.listdir(parts[0]):
        if f.endswith("model_states.pt"):
            shutil.copy2(os.path.join(parts[0], f), tmp)
    os.replace(tmp, out)
    with open(os.path.join(src, "latest_universal"), "w") as f:
        f.write(UNIVERSAL)
    return out


def load_universal(engine, ckpt_dir: str, tag: str) -> None:
    """Collective. Load ``{ckpt_dir}/{tag}/universal`` into an engine built for the current grid."""
    cfg = engine._config  # DeepSpeed reads this flag only inside load_checkpoint: set it for one call
    if not hasattr(cfg, "load_universal_checkpoint"):
        raise RuntimeError("this DeepSpeed has no load_universal_checkpoint config flag; cannot reshard")
    cfg.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(os.path.join(ckpt_dir, tag), tag=UNIVERSAL)
    finally:
        cfg.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal_dir(ckpt_dir, tag)}")
    place_adam_steps(engine.optimizer)


def place_adam_steps(optimizer) -> None:
    """DeepSpeed's universal loader sets each group's Adam ``step`` to the CPU tensor it saved, where
    torch's own ``load_state_dict`` would put it on the parameter's device for a fused or capturable
    optimizer; torch's fused AdamW (our ClippingAdamW on GPU) refuses a CPU step. Do what torch does,
    on the innermost optimizer (ZeRO and bf16 wrappers hold it as ``.optimizer``)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step) and step.device != p.device:
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def full_state_dict(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Unsharded fp32 weights of any checkpoint (any TP/DP degree), one entry per optimised
    parameter: a tied output weight appears once, under the embedding's name. (Names without
    optimizer state are skipped: ds_to_universal fills them from mp_rank_00's module state,
    which under TP is rank 0's shard, not the full tensor.)"""
    zero = os.path.join(convert_to_universal(ckpt_dir, tag), "zero")
    return {name: torch.load(os.path.join(zero, name, "fp32.pt"), weights_only=False)["param"].contiguous()
            for name in sorted(os.listdir(zero)) if os.path.isfile(os.path.join(zero, name, "exp_avg.pt"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megamod.train.reshard",
                                 description="Convert a checkpoint to DeepSpeed's universal format (done "
                                             "automatically on resume at another grid; this runs it ahead).")
    ap.add_argument("ckpt_dir", help="the run's checkpoints directory (train.run_dir/checkpoints)")
    ap.add_argument("--tag", help="step_XXXXXXXX (default: the newest complete one)")
    args = ap.parse_args(argv)
    tag = args.tag or find_latest_complete(args.ckpt_dir)
    if tag is None:
        print(f"no complete checkpoint in {args.ckpt_dir}", file=sys.stderr)
        return 2
    print(convert_to_universal(args.ckpt_dir, tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
