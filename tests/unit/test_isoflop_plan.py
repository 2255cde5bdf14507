"""Planning an isoFLOP sweep (megamod/train/isoflop/plan.py): the width/depth rule, steps solved
from the trainer's own FLOPs within 1% of the budget, the schedule ending at the last step, the
infeasible list with reasons, pieces within their GPU-time cap."""

import math

import pytest

from megamod.config import load_config
from megamod.model.flops import train_flops_per_step
from megamod.train.engine import lr_lambda
from megamod.train.isoflop.plan import PlanError, plan, spec_from_dict

BASE = ["--data.synthetic", "true", "--model.vocab_size", "8192", "--train.seq_len", "1024",
        "--train.micro_batch_size", "64", "--model.max_seq_len", "8192"]


def spec(**groups_and_keys):
    raw = {"config": "examples/configs/debug.yaml", "overrides": BASE, **groups_and_keys}
    return spec_from_dict(raw)


def test_sizes_steps_and_schedule_follow_the_rules():
    manifest = plan(spec(groups=[{"name": "g", "budgets": [1e16], "variants": ["dense", "mod"], "sizes": 4}]))
    runs = manifest["runs"]
    assert len(runs) == 8 and not manifest["infeasible"]
    n_star = math.sqrt(1e16 / 120)  # Chinchilla's 20 tokens per FLOPs-parameter
    for variant in ("dense", "mod"):
        mine = [r for r in runs if r["variant"] == variant]
        assert len({r["n_layers"] for r in mine}) == 4
        assert min(r["flops_params"] for r in mine) < n_star < max(r["flops_params"] for r in mine)
    dense, mod = ([r["params"] for r in runs if r["variant"] == v] for v in ("dense", "mod"))
    assert max(mod) > max(dense) and min(mod) > min(dense)  # MoD's bracket sits wider on the large side
    for r in runs:
        assert (r["d_model"], r["n_heads"], r["ffn_hidden"]) == (64 * r["n_layers"], r["n_layers"],
                                                                 -(-8 * r["d_model"] // 192) * 64)
        cfg = load_config(manifest["config"], r["args"])  # exactly what the trainer will be given
        assert cfg.train.steps == r["steps"] and cfg.model.d_model == r["d_model"]
        per_step = train_flops_per_step(cfg, 64)  # the number the trainer logs
        assert r["flops_per_step"] == per_step and abs(r["steps"] * per_step / 1e16 - 1) <= 0.01
        assert r["flops_6n"] == 6 * r["non_embedding_params"] * r["steps"] * 64 * 1024
        lr = lr_lambda(cfg)
        assert lr(r["steps"]) == pytest.approx(cfg.optim.min_lr / cfg.optim.lr)
        assert lr(r["steps"] - 50) > lr(r["steps"])
    # centre-first order: the first two runs of each variant are its middle sizes
    order = [r["n_layers"] for r in runs if r["variant"] == "dense"]
    assert sorted(order[:2]) == sorted(order)[1:3]


def test_infeasible_runs_are_listed_with_the_reason():
    manifest = plan(spec(min_steps=50, groups=[
        {"name": "small", "budgets": [3e12], "variants": ["dense"], "depths": [2, 3]},  # a handful of steps
        {"name": "long", "budgets": [1e16], "variants": ["dense"], "depths": [4],
         "overrides": ["--train.seq_len", "9000"]},  # config.validate refuses: over --model.max_seq_len
    ]))
    reasons = {r["name"]: r["reason"] for r in manifest["infeasible"]}
    assert not manifest["runs"] and len(reasons) == 3
    assert "min_steps 50" in reasons["3e12-dense-d128-l2-s1"]
    assert "--model.max_seq_len" in reasons["1e16-dense-d256-l4-s1"]


def test_pieces_scaling_groups_and_bad_specs():
    manifest = plan(spec(piece_s=80, overhead_s=10, assume_tflops=350, groups=[
        {"name": "iso", "budgets": [1e16], "variants": ["dense"], "sizes": 3},
        {"name": "law", "tokens_per_param": 20, "variants": ["full"], "depths": [3, 4], "new_piece": True}]))
    pieces: dict[int, float] = {}
    for r in manifest["runs"]:
        assert r["est_gpu_s"] == pytest.approx(r["flops"] / 350e12 + 10)
        pieces[r["piece"]] = pieces.get(r["piece"], 0) + r["est_gpu_s"]
    assert all(s <= 80 for s in pieces.values()) and len(pieces) >= 3
    law = [r for r in manifest["runs"] if r["group"] == "law"]
    assert law[0]["piece"] > max(r["piece"] for r in manifest["runs"] if r["group"] == "iso")  # new_piece
    for r in law:  # 20 tokens per non-embedding parameter
        assert r["tokens"] == pytest.approx(20 * r["non_embedding_params"], rel=0.01)
    with pytest.raises(PlanError, match="unknown variant 'mod25'"):
        spec(groups=[{"budgets": [1e16], "variants": ["mod25"]}])
    with pytest.raises(PlanError, match="either 'budgets'"):
        spec(groups=[{"variants": ["dense"]}])
    with pytest.raises(PlanError, match="unknown key 'budget'"):
        spec(groups=[{"budget": [1e16], "variants": ["dense"]}])
