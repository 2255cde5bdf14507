"""A rank that dies or hangs mid-step: the others exit non-zero within the collective timeout
(+30 s) naming it, and under torchrun --max-restarts the job resumes from the newest complete
checkpoint. Also: resuming a dp=2 checkpoint at dp=4 mid-run continues with exactly the global
batches an uninterrupted dp=4 run uses. (One rank of 2 killed, with the restart ending bit for
bit as the uninterrupted run: test_checkpoints.py, after a failed save.)

Real processes under torchrun (inject.py fires the faults; _faults.py launches and timestamps
each output line). Bound checked: the survivor's line naming the failed rank arrives no later
than fault time + collective_timeout_s (10 s) + 30 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections import defaultdict
from pathlib import Path

import pytest

from _faults import COMMON, TIMEOUT_S, launch, note, read_losses


def _named_in_time(run, run_dir: Path, kind: str, dead: int, survivors: list[int], timeout_s: float = TIMEOUT_S) -> None:
    """Every survivor printed a line naming the dead rank within timeout + 30 s of the fault."""
    fault = note(run_dir, kind, dead)
    for r in survivors:
        hit = run.first(f"[rank {r}] rank {dead} stopped responding")
        assert hit is not None, f"rank {r} did not name rank {dead}:\n{run.text[-5000:]}"
        assert hit[0] - fault["time"] <= timeout_s + 30, (r, hit[0] - fault["time"], hit[1])


def test_sigstop_one_rank_is_named_within_the_timeout_and_nothing_hangs(tmp_path):
    run_dir = tmp_path / "run"

    def on_line(run, line):  # torchrun would wait 30 s for the stopped rank to take its SIGTERM
        if "megamod-train: error" in line:
            os.kill(note(run_dir, "stop", 1)["pid"], signal.SIGKILL)

    run = launch(run_dir, *COMMON, "--train.collective_timeout_s", "5", nproc=2, on_line=on_line, timeout=120,
                 faults=[{"kind": "stop", "rank": 1, "step": 4}])
    assert run.rc != 0
    _named_in_time(run, run_dir, "stop", 1, [0], timeout_s=5)
    assert "exitcode  : 3" in run.text  # torchrun's report: rank 0 exited with EXIT_PEER_FAILED


def _global_batches(run_dir: Path, world: int) -> dict[int, list[int]]:
    """step -> sample indices of every rank's micro-batches in rank order (the latest attempt's)."""
    per_step: dict[int, dict[int, tuple[int, list[int]]]] = defaultdict(dict)
    for r in range(world):
        for rec in map(json.loads, (run_dir / f"samples_rank{r}.jsonl").read_text().splitlines()):
            prev = per_step[rec["step"]].get(r)
            if prev is None or prev[0] < rec["attempt"]:
                per_step[rec["step"]][r] = (rec["attempt"], [])
            if per_step[rec["step"]][r][0] == rec["attempt"]:
                per_step[rec["step"]][r][1].extend(rec["indices"])
    return {s: [i for r in range(world) for i in ranks[r][1]] for s, ranks in per_step.items()}


def test_dp2_checkpoint_resumed_at_dp4_continues_with_the_same_batches_and_survives_a_sigkill(reference, tmp_path):
    """The reference's dp=2 checkpoint at step 4 (micro-batch 4) resumes at dp=4 (micro-batch 2:
    the same 8 samples a step) through DeepSpeed's universal checkpoint; rank 2 of 4 is killed at
    step 14 and torchrun restarts the job from step 12. Steps 5-24, 20 global batches (every
    rank's micro-batch in rank order), must hold the samples an uninterrupted dp=4 run reads (the
    trainer's sampler from sample 0 at dp=4, micro-batch 2), which are also the ones the
    uninterrupted dp=2 reference read, recorded. The losses follow the reference to 1e-5: the same
    samples, only the gradient's fp32 summation order differs (over 4 ranks instead of 2)."""
    from megamod.data.sampler import DistributedBatchSampler

    ref_dir, ref = reference
    resumed = tmp_path / "resumed"
    shutil.copytree(ref_dir / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    run = launch(resumed, *COMMON, "--train.micro_batch_size", "2", nproc=4, max_restarts=1,
                 faults=[{"kind": "record_samples"}, {"kind": "kill", "rank": 2, "step": 14}])
    assert run.rc == 0, run.text[-5000:]
    assert "resharding via a DeepSpeed universal checkpoint" in run.text
    assert "step_00000004 at step 4" in run.text and "step_00000012 at step 12" in run.text
    _named_in_time(run, resumed, "kill", 2, [0, 1, 3])

    got, dp2 = _global_batches(resumed, 4), _global_batches(ref_dir, 2)
    samplers = [iter(DistributedBatchSampler(24 * 8, 2, r, 4, 0)) for r in range(4)]
    dp4 = {step: [i for s in samplers for i in next(s)] for step in range(1, 25)}
    assert sorted(got) == list(range(5, 25))
    for step in range(5, 25):
        assert len(got[step]) == 8 and got[step] == dp4[step] == dp2[step], step
    losses = read_losses(resumed)
    for step in range(5, 25):
        assert losses[step] == pytest.approx(ref[step], rel=1e-5), step
