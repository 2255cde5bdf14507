"""Context parallelism through the real CLI: cp 2 MoBA (hybrid: its last block dense) on 2 ranks
trains, evaluates and logs like one rank, and reports its CP metrics.

Same global batch and data on both sides; fp32; the runs differ only in summation order, so
losses agree to 1e-5 relative (tests/distributed/test_cp_train.py derives the bound)."""

from __future__ import annotations

import json

import pytest

from conftest import read_losses  # noqa: F401  (pytest puts this dir on sys.path)

MOBA = ["--model.attention", "moba", "--moba.chunk_size", "4", "--moba.topk", "3", "--moba.full_attention_layers",
        "-1", "--train.steps", "6", "--train.eval_interval", "3", "--optim.zero_stage", "1",
        "--checkpoint.save_at_end", "false", "--logging.tensorboard", "true"]


def _records(run_dir, kind: str) -> dict[int, dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f) if r["kind"] == kind}


def test_cp2_moba_cli_matches_one_rank(tmp_path, train):
    train(tmp_path / "one", *MOBA)
    out = train(tmp_path / "cp2", *MOBA, "--parallel.cp", "2", nproc=2)
    assert "done: 6 steps" in out.stdout
    one, cp2 = read_losses(tmp_path / "one"), read_losses(tmp_path / "cp2")
    assert sorted(cp2) == list(range(1, 7))
    for s in range(1, 7):
        assert cp2[s] == pytest.approx(one[s], rel=1e-5), s
    v1, v2 = _records(tmp_path / "one", "valid"), _records(tmp_path / "cp2", "valid")
    assert sorted(v2) == [0, 3, 6]
    for s in v2:
        assert v2[s]["val_loss"] == pytest.approx(v1[s]["val_loss"], rel=1e-5), s
    last = _records(tmp_path / "cp2", "train")[6]
    moba, dense = "layers.0.attention.inner/", "layers.1.attention.inner/"
    # per micro-batch (4 samples × 32 tokens, 4 kv heads × head dim 16, fp32), each rank receives the
    # other half of K and of V: 4 · 16 · 4 · 16 · 4 bytes each
    assert last[moba + "cp_bytes_k"] == last[dense + "cp_bytes_v"] == 4 * 16 * 4 * 16 * 4
    assert last[moba + "cp_work_max"] >= last[moba + "cp_work"] > 0  # mean and max over ranks
    assert (tmp_path / "cp2" / "tensorboard").is_dir()
