"""The dry run (megamod.train.dryrun): pipeline split, per-rank memory and the CLI, all pure
arithmetic on configs far larger than the machine (no process group)."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from megamod.config import load_config, validate
from megamod.model.gpt import count_parameters
from megamod.train.cli import main
from megamod.parallel.pipeline import stage_layers
from megamod.train.dryrun import memory_per_rank, stage_flops, stage_split

ROOT = Path(__file__).resolve().parents[2]
CONFIG_2B, CONFIG_1B = str(ROOT / "examples/configs/2b.yaml"), str(ROOT / "examples/configs/1b.yaml")
# 2b has 20 heads, so tp 8 is refused (see test_cli_bad_grid_exits_2); tp 4 × pp 4 × dp 16 = 256.
GRID_2B = ["--parallel.tp", "4", "--parallel.pp", "4"]


@pytest.mark.parametrize("zero, dtype", [(0, "bf16"), (1, "bf16"), (2, "bf16"), (2, "fp32"), (0, "master")])
def test_2b_memory_matches_zero_formulas(zero, dtype):
    """2b: d 2560, L 24, F 6912, V 32000, untied, so count_parameters gives
        N = L·(4d² + 3·d·F + 2d) + 2·V·d + d      (blocks with 2 norms, embedding, output, final norm)
    FLOPs balance puts 6 blocks on each stage (the output, ~0.9 of a block, cannot move a whole
    block off the last stage without overloading another), so the largest stage is the last:
        P = 6·(4d² + 3·d·F)/tp + 6·2d + V·d/tp + d  (norms replicated, the rest TP-sharded)
    Bytes per parameter (weights, grads, optimizer): bf16 with fp32 master weights (2, 2, 12), the
    default at ZeRO ≥ 1 and "master" here; bf16 under autocast (4, 4, 8), the default at ZeRO 0;
    fp32 (4, 4, 8). ZeRO-k divides the first k of (optimizer, gradients, weights) by the ZeRO
    group dp·cp = 16."""
    mode = ["--train.bf16_mode", "master_weights"] if dtype == "master" else []
    cfg = load_config(CONFIG_2B, [*GRID_2B, "--optim.zero_stage", str(zero),
                                  "--train.dtype", "fp32" if dtype == "fp32" else "bf16", *mode])
    validate(cfg, 256)
    d, L, F, V, tp, z = 2560, 24, 6912, 32000, 4, 16
    n = count_parameters(cfg.model)["total"]
    block_linear = (n - 2 * V * d - d) // L - 2 * d
    assert block_linear == 4 * d * d + 3 * d * F
    assert stage_split(cfg) == [list(range(s, s + 6)) for s in range(0, 24, 6)]
    p = 6 * block_linear // tp + 6 * 2 * d + V * d // tp + d
    w, g, o = (4, 4, 8) if dtype == "fp32" or (dtype == "bf16" and zero == 0) else (2, 2, 12)
    expected = {"parameters": w * p / (z if zero >= 3 else 1), "gradients": g * p / (z if zero >= 2 else 1),
                "optimizer": o * p / (z if zero >= 1 else 1)}
    mem = memory_per_rank(cfg, 256)
    assert {k: mem[k] for k in expected} == expected
    assert mem["activations"] > 0 and mem["logits"] > 0 and mem["cp_kv"] == 0
    assert mem["total"] == pytest.approx(sum(expected.values()) + mem["activations"] + mem["logits"])


@pytest.mark.parametrize("accum, grad_bytes", [(1, 2), (2, 4)])
def test_one_rank_zero0_plans_master_fused(accum, grad_bytes):
    """One rank at ZeRO 0 trains with MasterAdamW (train.bf16_mode auto): bf16 weights (2 B) and
    gradients (2 B; with grad_accum > 1 their fp32 sum, 4 B) and 12 B of fp32 master weights and
    moments per parameter, nothing partitioned."""
    cfg = load_config(CONFIG_1B, ["--optim.zero_stage", "0", "--train.grad_accum", str(accum)])
    validate(cfg, 1)
    n = count_parameters(cfg.model)["total"]
    mem = memory_per_rank(cfg, 1)
    assert (mem["parameters"], mem["gradients"], mem["optimizer"]) == (2 * n, grad_bytes * n, 12 * n)


def _check_cover(stages, n):
    assert all(stages) and list(itertools.chain(*stages)) == list(range(n))  # each block once, in order


def test_mod_1b_split_is_balanced():
    """1b with MoD: 22 blocks, every odd block routed at 12.5% (~0.11 of a dense block's FLOPs),
    and an output projection of ~1.1 blocks on the last stage; 4 stages balance within 10%."""
    cfg = load_config(CONFIG_1B, ["--mod.enabled", "true", "--parallel.pp", "4"])
    stages = stage_split(cfg)
    _check_cover(stages, 22)
    assert len(stages) == 4
    flops = stage_flops(cfg, stages)
    assert max(flops) / (sum(flops) / 4) < 1.10


def test_explicit_stage_sizes_override_the_split():
    cfg = load_config(CONFIG_1B, ["--parallel.pp", "4", "--parallel.pp_layers", "4", "6", "6", "6"])
    validate(cfg, 4)
    assert stage_layers(cfg) == [list(range(0, 4)), list(range(4, 10)), list(range(10, 16)), list(range(16, 22))]


def test_split_is_the_min_max_over_all_cuts():
    """Brute force over every contiguous split of a 9-block MoD model into 3 stages."""
    cfg = load_config(None, ["--data.synthetic", "true", "--model.n_layers", "9", "--mod.enabled", "true",
                             "--parallel.pp", "3", "--train.seq_len", "256"])
    stages = stage_split(cfg)
    _check_cover(stages, 9)
    best = min(max(stage_flops(cfg, [list(range(0, i)), list(range(i, j)), list(range(j, 9))]))
               for i in range(1, 8) for j in range(i + 1, 9))
    assert max(stage_flops(cfg, stages)) == best


def test_cli_dry_run_prints_the_plan():
    out = subprocess.run([sys.executable, "-m", "megamod.train", "--dry-run", "--world-size", "256",
                          "--config", CONFIG_2B, *GRID_2B],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for needle in ("tp 4 × cp 1 × dp 16 × pp 4", "rank 0: tp 0, cp 0, dp 0, pp 0", "max/mean FLOPs",
                   "ZeRO-2 over dp·cp = 16", "Korthikanti", "bound", "FLOPs per sequence"):
        assert needle in out.stdout


def test_cli_bad_grid_exits_2(capsys):
    """In-process, to show that no process group is started on either path."""
    base = ["--dry-run", "--config", CONFIG_2B]
    assert main([*base, "--world-size", "100", "--parallel.tp", "8"]) == 2
    assert "world size 100 is not divisible by tp·cp·pp" in capsys.readouterr().err
    assert main([*base, "--world-size", "256", "--parallel.tp", "8", "--parallel.pp", "4"]) == 2
    assert "not divisible by --parallel.tp 8" in capsys.readouterr().err  # 20 heads
    assert main([*base, "--world-size", "256", *GRID_2B, "--optim.zero_stage", "3"]) == 2
    assert "use --optim.zero_stage 2" in capsys.readouterr().err  # ZeRO-3 with PP: refused, with what works
    assert main([*base, "--world-size", "256", *GRID_2B, "--parallel.pp_layers", "6", "6", "6"]) == 2
    assert "must give 4 stage sizes" in capsys.readouterr().err
    assert not dist.is_initialized()


@pytest.mark.parametrize("name", ["1b_moba_long", "1b_mod_moba_long"])
def test_long_context_recipes_fit_an_h200_per_rank(name):
    """examples/configs/1b_moba_long.yaml: 1b, seq 1M over cp 8, MoBA 4096/12 with 3 dense layers,
    activation checkpointing, the loss in chunks of 8192 tokens; the MoD variant routes blocks 1, 3,
    ... per window of 8192. Per rank s = 131072 tokens:
        block inputs 22 · 2·s·h = 11 GiB + one block recomputed s·h·34 = 8.5 GiB (activations)
        logits of one chunk 8192·V·6 = 1.5 GiB; gathered K/V of the whole 1M: 2·S·Hkv·D·(2 + 4) = 24 GiB
        weights/grads/optimizer 16 B/param with the optimizer over ZeRO-1's 8 ranks ≈ 6.5 GiB
    ≈ 51 GiB, under an H200's 141 (the full logits would add 22 GiB)."""
    config = str(ROOT / f"examples/configs/{name}.yaml")
    cfg = load_config(config)
    validate(cfg, 8)
    mem = memory_per_rank(cfg, 8)
    gib = 2**30
    s, h, V, S, kv = 131072, 2048, 32000, 2**20, 16 * 128
    assert mem["activations"] == pytest.approx(22 * 2 * s * h + s * h * 34)
    assert mem["logits"] == pytest.approx(8192 * V * 6) and mem["cp_kv"] == pytest.approx(2 * S * kv * 6)
    assert 45 * gib < mem["total"] < 141 * gib
    out = subprocess.run([sys.executable, "-m", "megamod.train", "--dry-run", "--world-size", "8", "--config", config],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "tp 1 × cp 8 × dp 1 × pp 1" in out.stdout and "cp K/V" in out.stdout, out.stderr
