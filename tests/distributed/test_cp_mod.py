"""Mixture-of-Depths under context parallelism (parallel/routed_cp.py) == training one device.

Gloo runs of the real Trainer, fp32, 10 steps of global batch 4 (micro-batch 2), a 4-block model
with blocks 1 and 3 routed at capacity 0.25, router BCE and predictor losses on, grad_clip 0.5:

- window mode: cp 2 with mod.window 8 (= seq 32 / (2·cp)), cp 4 with window 4, learned and
  random routing, each against one device with the same window; every rank routes the same
  number of tokens (asserted from the blocks' statistics);
- global mode: cp 2 and cp 4, window 0, with cp_slack large enough that no rank can overflow
  (cap = k), against one device with window 0: the exact per-sequence top-k;
- MoD + MoBA + CP: tp 2 × cp 2 with sequence parallelism, MoBA (block 4, topk 2) in every block,
  seq 64, window 16 (4 routed tokens per CP chunk: one MoBA block of the compacted sequence),
  against one device.
- a forced skew in global mode (2 ranks): a routed block whose router favours rank 0's tokens,
  cp_slack 0: rank 0's excess rides the residual and is counted, no rank processes more than its
  cap, and forward and backward finish.

Tolerance as in test_cp_train.py (losses 1e-5, grad norms 5e-5: summation order only).
"""

from __future__ import annotations

import os

import pytest

from _harness import run_distributed
from _trainers import build_trainer, train_steps

STEPS = 10
MOD = ["--mod.enabled", "true", "--mod.capacity", "0.25", "--mod.aux_loss_weight", "0.1", "--mod.predictor", "true"]
RANDOM = ["--mod.routing", "random"]
SP = ("--parallel.sequence_parallel", "true")
MOBA = ["--model.attention", "moba", "--moba.chunk_size", "4", "--moba.topk", "2", "--train.seq_len", "64"]
# label -> (world, tp, cp, flags); the reference is one device with the same flags (cp and tp aside)
RUNS = {
    "cp2_window": (2, 1, 2, ["--mod.window", "8"]),
    "cp2_window_random": (2, 1, 2, ["--mod.window", "8", *RANDOM]),
    "cp2_global": (2, 1, 2, ["--mod.cp_balance", "global", "--mod.cp_slack", "1.0"]),
    "cp4_window": (4, 1, 4, ["--mod.window", "4"]),
    "cp4_window_random": (4, 1, 4, ["--mod.window", "4", *RANDOM]),
    "cp4_global": (4, 1, 4, ["--mod.cp_balance", "global", "--mod.cp_slack", "3.0"]),
    "tp2_cp2_sp_moba": (4, 2, 2, ["--mod.window", "16", *MOBA, *SP]),
}


def _cfg(run_dir: str, tp: int, cp: int, dp: int, *extra: str):
    from megamod.config import load_config

    return load_config(None, [
        "--data.synthetic", "true", "--model.n_layers", "4", "--model.d_model", "64", "--model.n_heads", "4",
        "--model.n_kv_heads", "2", "--model.ffn_hidden", "128", "--model.vocab_size", "256",
        "--train.seq_len", "32", "--train.micro_batch_size", "2", "--train.grad_accum", str(2 // dp),
        "--train.steps", str(STEPS), "--optim.warmup_steps", "3", "--optim.grad_clip", "0.5",
        "--parallel.tp", str(tp), "--parallel.cp", str(cp), "--train.run_dir", run_dir, "--checkpoint.resume", "false",
        "--train.eval_interval", "0", "--train.log_interval", "1", "--logging.tensorboard", "false",
        "--train.progress", "off", *MOD, *extra])


def _grids(rank: int, world_size: int, tmp: str, labels: list[str]) -> dict:
    out = {}
    for label in labels:
        _, tp, cp, flags = RUNS[label]
        trainer = build_trainer(rank, world_size, _cfg(os.path.join(tmp, label), tp, cp, world_size // (tp * cp),
                                                       *flags))
        out[label] = train_steps(trainer, STEPS)
        out[(label, "routed")] = trainer.model.layers["1"].log_metrics()
    return out


def _references(rank: int, world_size: int, tmp: str) -> dict:
    out = {}
    for label, (_, _, _, flags) in RUNS.items():
        # one device: no sequence parallelism; and no cp_balance: window 0 is the exact per-sequence top k
        ref_flags = [] if "global" in label else [f for f in flags if f not in SP]
        out[label] = train_steps(build_trainer(rank, 1, _cfg(os.path.join(tmp, "ref_" + label), 1, 1, 1, *ref_flags)),
                                 STEPS)
    return out


def _skew(rank: int, world_size: int) -> dict:
    """One routed block, global mode, cp 2, slack 0: the router's logit is a token's first input
    feature, and rank 0's tokens get +10 there, so the whole top k is on rank 0."""
    import torch
    import torch.distributed as dist

    from megamod.config import ModConfig, ModelConfig
    from megamod.model.attention import SDPAttention
    from megamod.model.mod import RoutedBlock
    from megamod.parallel.cp_comm import CPComm
    from megamod.parallel.routed_cp import apply_routed_cp
    from megamod.model.rope import rope_tables
    from megamod.parallel.cp_comm import zigzag_positions

    torch.manual_seed(0)
    m = ModelConfig(d_model=16, n_heads=2, n_kv_heads=2, ffn_hidden=32)
    block = RoutedBlock(m, SDPAttention(), ModConfig(enabled=True, capacity=0.25, predictor=False))
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0, 0] = 1.0
    holder = torch.nn.Module()
    holder.block = block
    apply_routed_cp(holder, lambda: CPComm(dist.group.WORLD, rank, world_size), 32, "global", 0.0)
    block.train()
    x = torch.randn(2, 16, 16)
    x[..., 0] = x[..., 0].abs() + (10.0 if rank == 0 else 0.0)
    x.requires_grad_()
    cos, sin = rope_tables(zigzag_positions(32, world_size, rank), m.head_dim, m.rope_theta)
    out = block(x, cos, sin)
    out.sum().backward()
    stats = block.log_metrics()
    return dict(stats=stats, finite=bool(torch.isfinite(out).all() and torch.isfinite(x.grad).all()),
                changed=int((out != x).any(-1).sum()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("cp_mod"))
    out = {}
    for world in (2, 4):
        labels = [k for k, v in RUNS.items() if v[0] == world]
        results = run_distributed(_grids, world, tmp, labels, timeout=900)
        for label in labels:
            out[label] = [r[label] for r in results]
            out[(label, "routed")] = [r[(label, "routed")] for r in results]
    out["ref"] = run_distributed(_references, 1, tmp, timeout=900)[0]
    out["skew"] = run_distributed(_skew, 2, timeout=300)
    return out


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("label", list(RUNS))
def test_mod_under_cp_matches_one_device(runs, label):
    ref = runs["ref"][label]
    for got in runs[label]:
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref), start=1):
            assert _close(loss, ref_loss), (step, loss, ref_loss)
            assert _close(norm, ref_norm, 5e-5), (step, norm, ref_norm)
    assert ref[-1][0] < ref[0][0]
    counts = [r["selected_tokens"] for r in runs[(label, "routed")]]
    if "window" in label or "moba" in label:  # every rank routes its own windows: equal counts by construction
        assert len(set(counts)) == 1, counts
    else:  # global mode, no overflow possible (cap = k): the ranks' counts add up to the top k
        assert all(r["cp_overflow"] == 0 for r in runs[(label, "routed")])
        assert sum(counts) == pytest.approx(2 * 0.25 * 32)  # micro-batch 2 × k = 8


def test_global_mode_counts_the_overflow_of_a_skewed_router(runs):
    r0, r1 = runs["skew"]
    k, cap = 8, 4  # k = 0.25 · 32 per sequence; cap = ceil(k/cp · (1 + 0)) = 4
    assert r0["stats"]["cp_cap"] == 2 * cap and r1["stats"]["cp_cap"] == 2 * cap  # padded rows, micro-batch 2
    assert r0["stats"]["cp_overflow"] == 2 * (k - cap)  # rank 0 held the whole top k of both sequences
    assert r1["stats"]["cp_overflow"] == 0 and r1["stats"]["selected_tokens"] == 0
    assert r0["stats"]["selected_tokens"] == 2 * cap and r0["changed"] == 2 * cap  # bounded by the cap
    assert r0["finite"] and r1["finite"]
