"""The project's sbatch scripts on a real (one-node) Slurm cluster: 2 tasks, gloo on CPU.

- a debug run submitted with sbatch finishes and leaves TensorBoard events and a checkpoint;
- SIGUSR1 mid-run: every rank checkpoints, rank 0 requeues the job, the requeued job resumes
  (its first logged step is the one after the checkpoint) and ends with the uninterrupted loss;
- SIGUSR1 to the batch shell only is forwarded to the ranks; plain scancel (SIGTERM) checkpoints
  but leaves the job cancelled;
- --train.exit_after_minutes: the job checkpoints and ends; resubmitted, it resumes the same way;
- a rank killed mid-step: the job requeues itself and resumes from its last checkpoint;
- an isoFLOP manifest (tools/isoflop.py plan) runs as a job array, one run directory per run, and a
  resubmitted array skips the finished runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.util import tensor_util

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# ---- What the jobs run: the real trainer (`python -m megamod.train`, the scripts' default) on the
# tiny synthetic-data model of tests/integration/conftest.py, logging every step.
TRAIN_CMD: str | None = None
CONFIG = "examples/configs/debug.yaml"
TRAIN_ARGS = ["--data.synthetic", "true", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
              "--model.n_kv_heads", "4", "--model.ffn_hidden", "128", "--model.vocab_size", "512",
              "--train.seq_len", "32", "--train.micro_batch_size", "4", "--train.log_interval", "1",
              "--train.eval_interval", "0", "--train.eval_steps", "2", "--optim.warmup_steps", "3",
              "--checkpoint.interval", "0", "--train.progress", "off"]
JOB_ENV = {"DS_ACCELERATOR": "cpu"}
STEPS = 300  # ~8 s of steps on 2 idle cores: time to signal mid-run
EXIT_AFTER_MINUTES = "0.05"  # 3 s after the StopController starts: well before STEPS are done
LOSS_TAG = "train/loss"  # the training loss in TensorBoard
STEP_LINE = re.compile(r"^0: .*\bstep\s+(\d+)\b")  # a rank-0 log line naming the step just finished
# ----

SBATCH_TWO_CPU_TASKS = [  # the scripts ask for GPU nodes; the test cluster has one node with 2 CPUs
    "--nodes=1",
    "--ntasks-per-node=2",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    # Longer than the scripts' --signal=USR1@600 lead: with a shorter limit Slurm signals at once.
    "--time=30",
]
JOB_TIMEOUT_S = 180


def job_env() -> dict[str, str]:
    env = {
        **os.environ,
        # the jobs' `python` is this interpreter, the package is this checkout
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        **JOB_ENV,
    }
    if TRAIN_CMD is not None:
        env["MEGAMOD_TRAIN_CMD"] = TRAIN_CMD
    return env


def loss_by_file(run_dir: Path) -> list[dict[int, float]]:
    """The logged losses {step: loss} of each TensorBoard events file, oldest file first."""
    # events.out.tfevents.{unix time}.{host}.{pid}...: one file per process, in start order
    files = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"),
                   key=lambda p: (int(p.name.split(".")[3]), p.name))
    result = []
    for f in files:
        losses = {}
        for event in LegacyEventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag == LOSS_TAG:
                    simple = v.WhichOneof("value") == "simple_value"
                    losses[event.step] = v.simple_value if simple else float(tensor_util.make_ndarray(v.tensor))
        if losses:
            result.append(losses)
    return result


def final_loss(run_dir: Path, steps: int) -> float:
    per_file = loss_by_file(run_dir)
    assert per_file, f"no {LOSS_TAG} events under {run_dir / 'tensorboard'}"
    assert steps in per_file[-1], f"last events file ends at step {max(per_file[-1])}, expected {steps}"
    return per_file[-1][steps]


def assert_resumed(run_dir: Path, steps: int) -> int:
    """The run was split in two processes and the second continued where the first stopped."""
    per_file = loss_by_file(run_dir)
    assert len(per_file) >= 2, f"expected events from an interrupted and a resumed attempt, got {len(per_file)} file(s)"
    stopped_at = max(per_file[0])
    assert stopped_at < steps, f"the first attempt ran to step {stopped_at}: it was not interrupted"
    assert min(per_file[-1]) == stopped_at + 1, (
        f"the resumed attempt logged steps {min(per_file[-1])}..{max(per_file[-1])}, expected to start at "
        f"{stopped_at + 1}: it did not resume from the checkpoint taken after step {stopped_at}"
    )
    return stopped_at


def submit_debug_run(cluster: Any, run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> str:
    args = ["--config", CONFIG, *TRAIN_ARGS, "--train.steps", str(STEPS), "--train.run_dir", str(run_dir), *overrides]
    options = [*SBATCH_TWO_CPU_TASKS, f"--output={run_dir.parent}/slurm-%j.out"]
    return cluster.sbatch(REPO / "slurm" / "pretrain_1b.sbatch", args, options, env or job_env())


def describe(run_dir: Path, job_id: str) -> str:
    slurm_out = run_dir.parent / f"slurm-{job_id}.out"
    log = run_dir / "logs" / f"{job_id}.out"
    return "\n".join(
        f"--- {p} ---\n{p.read_text()[-3000:] if p.exists() else '(missing)'}" for p in (slurm_out, log)
    )


@pytest.fixture(scope="module")
def reference_run(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job_id = submit_debug_run(slurm_cluster, run_dir)
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT_S, log=run_dir / "logs" / f"{job_id}.out")
    return run_dir, job_id, job


def test_sbatch_debug_run_finishes_with_events_and_checkpoint(reference_run):
    run_dir, job_id, job = reference_run
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), describe(run_dir, job_id)
    assert job["NumTasks"] == "2"
    log = (run_dir / "logs" / f"{job_id}.out").read_text()
    # srun --label prefixes every line with its rank: both ranks ran, found their place through
    # Slurm's variables, and wrote to the run's log.
    for rank in (0, 1):
        assert re.search(rf"^{rank}: .*rank {rank}/2 \(local {rank}/2\) via slurm", log, re.M), log[-3000:]
    slurm_out = (run_dir.parent / f"slurm-{job_id}.out").read_text()
    assert f"tensorboard --logdir {run_dir}/tensorboard" in slurm_out
    assert "srun exited with 0" in slurm_out
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert sorted(loss_by_file(run_dir)[-1]) == list(range(1, STEPS + 1))
    assert any((run_dir / "checkpoints").iterdir()), "no checkpoint written"


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(slurm_cluster, reference_run, tmp_path):
    ref_dir, _, ref_job = reference_run
    assert ref_job["JobState"] == "COMPLETED"
    run_dir = tmp_path / "run"
    job_id = submit_debug_run(slurm_cluster, run_dir)
    log = run_dir / "logs" / f"{job_id}.out"
    # Signal once a few steps are done; like `#SBATCH --signal=USR1@N`, scancel --signal reaches the
    # tasks of the job's steps (every rank), not the batch shell.
    slurm_cluster.wait_for_line(job_id, log, lambda s: (m := STEP_LINE.match(s)) and int(m[1]) >= 3, JOB_TIMEOUT_S)
    slurm_cluster.signal(job_id, "USR1")
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT_S, log=log)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), describe(run_dir, job_id)
    assert job["Restarts"] == "1", f"expected one requeue, got Restarts={job['Restarts']}\n{describe(run_dir, job_id)}"
    stopped_at = assert_resumed(run_dir, STEPS)
    assert 3 <= stopped_at < STEPS
    assert log.read_text().count(f"===== job {job_id} attempt") == 2  # one log, both attempts appended
    assert final_loss(run_dir, STEPS) == final_loss(ref_dir, STEPS)


def test_signal_to_batch_shell_is_forwarded_to_every_rank(slurm_cluster, tmp_path):
    """`scancel --signal=USR1 --batch` (or `--signal=B:USR1@N`) reaches only the batch shell.

    The shell passes it to srun, which passes it to the ranks: they checkpoint and requeue the job
    (resuming is the previous test's business, so the requeued job is cancelled).
    """
    run_dir = tmp_path / "run"
    job_id = submit_debug_run(slurm_cluster, run_dir)
    log = run_dir / "logs" / f"{job_id}.out"
    slurm_cluster.wait_for_line(job_id, log, lambda s: (m := STEP_LINE.match(s)) and int(m[1]) >= 3, JOB_TIMEOUT_S)
    slurm_cluster.signal(job_id, "USR1", "--batch")
    job = slurm_cluster.wait_requeued(job_id, JOB_TIMEOUT_S, log=log)
    subprocess.run(["scancel", job_id], env=slurm_cluster.env(), check=True)
    assert "batch shell got SIGUSR1: forwarding to srun" in (run_dir.parent / f"slurm-{job_id}.out").read_text()
    assert job["Restarts"] == "1"
    stopped_at = max(loss_by_file(run_dir)[0])
    assert 3 <= stopped_at < STEPS, describe(run_dir, job_id)
    assert any((run_dir / "checkpoints").iterdir()), "no checkpoint before the requeue"


def test_scancel_checkpoints_but_does_not_requeue(slurm_cluster, tmp_path):
    """Plain `scancel`: SIGTERM to every rank (and the batch shell). The ranks checkpoint within
    KillWait, and the job stays cancelled: a requeue here would undo the user's scancel."""
    run_dir = tmp_path / "run"
    job_id = submit_debug_run(slurm_cluster, run_dir)
    log = run_dir / "logs" / f"{job_id}.out"
    slurm_cluster.wait_for_line(job_id, log, lambda s: (m := STEP_LINE.match(s)) and int(m[1]) >= 3, JOB_TIMEOUT_S)
    subprocess.run(["scancel", job_id], env=slurm_cluster.env(), check=True)
    # The job is CANCELLED at once; its ranks are done once the batch shell reports srun's exit.
    slurm_cluster.wait_for_line(job_id, run_dir.parent / f"slurm-{job_id}.out", lambda s: "srun exited with" in s,
                                JOB_TIMEOUT_S, until_ended=False)
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT_S, log=log)  # COMPLETING -> CANCELLED
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), describe(run_dir, job_id)
    assert any((run_dir / "checkpoints").iterdir()), f"no checkpoint on SIGTERM\n{describe(run_dir, job_id)}"


def test_exit_after_minutes_checkpoints_and_a_resubmitted_job_resumes(slurm_cluster, reference_run, tmp_path):
    ref_dir, _, _ = reference_run
    run_dir = tmp_path / "run"
    first = submit_debug_run(slurm_cluster, run_dir, "--train.exit_after_minutes", EXIT_AFTER_MINUTES)
    job = slurm_cluster.wait(first, JOB_TIMEOUT_S, log=run_dir / "logs" / f"{first}.out")
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), describe(run_dir, first)
    stopped_at = max(loss_by_file(run_dir)[-1])
    assert stopped_at < STEPS, f"the time limit did not stop the run (it reached step {stopped_at})"
    second = submit_debug_run(slurm_cluster, run_dir)  # the same command again: resume
    job = slurm_cluster.wait(second, JOB_TIMEOUT_S, log=run_dir / "logs" / f"{second}.out")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), describe(run_dir, second)
    assert assert_resumed(run_dir, STEPS) == stopped_at
    assert final_loss(run_dir, STEPS) == final_loss(ref_dir, STEPS)


def test_a_killed_rank_is_named_and_the_requeued_job_resumes_to_the_same_loss(slurm_cluster, reference_run, tmp_path):
    """SIGKILL of rank 1 mid-step (tests/faults/inject.py): srun names the task and ends the step
    (--kill-on-bad-exit kills rank 0 at once, so here srun's line is the one naming rank 1), the
    batch script requeues the job (slurm/common.sh: a rank failed), and the requeued job resumes
    from the checkpoint at step 100 and ends with the uninterrupted run's loss."""
    ref_dir, _, _ = reference_run
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    env = {**job_env(), "MEGAMOD_TRAIN_CMD": f"python {REPO}/tests/faults/inject.py", "MEGAMOD_FAULTS_DIR": str(run_dir),
           "MEGAMOD_FAULTS": json.dumps([{"kind": "kill", "rank": 1, "step": 120, "dir": str(run_dir)}])}
    job_id = submit_debug_run(slurm_cluster, run_dir, "--checkpoint.interval", "50", env=env)
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT_S, log=run_dir / "logs" / f"{job_id}.out")
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), describe(run_dir, job_id)
    log = (run_dir / "logs" / f"{job_id}.out").read_text()
    batch = (run_dir.parent / f"slurm-{job_id}.out").read_text()  # srun's own messages
    assert "srun: error: " in batch and "task 1: Killed" in batch, describe(run_dir, job_id)  # names the rank
    assert "a rank failed (srun exit 137): requeueing" in batch
    first = log.split(f"===== job {job_id} attempt 2")[0]  # a killed rank's TensorBoard may not have flushed
    steps = [int(m[1]) for m in map(STEP_LINE.match, first.splitlines()) if m]
    assert max(steps) == 119, describe(run_dir, job_id)
    assert min(loss_by_file(run_dir)[-1]) == 101  # resumed from the checkpoint at step 100
    assert final_loss(run_dir, STEPS) == final_loss(ref_dir, STEPS)


def test_isoflop_plan_runs_as_a_job_array(slurm_cluster, tmp_path):
    """A 2-run manifest of debug models (depths 1 and 2 by the width/depth rule) planned by
    tools/isoflop.py runs as a job array, one run directory per run, each adding its row to the
    sweep's results table; submitted again, both tasks find their run finished and skip it."""
    import json

    spec = tmp_path / "sweep.yaml"
    model_free = [a for i, a in enumerate(TRAIN_ARGS) if not (a.startswith("--model.") or
                                                             (i and TRAIN_ARGS[i - 1].startswith("--model.")))]
    spec.write_text(json.dumps({
        "config": CONFIG, "overrides": [*model_free, "--model.vocab_size", "512"], "min_steps": 5, "tolerance": 0.2,
        "world_size": 2,  # the array tasks run 2 ranks: a step is 2 x 4 sequences
        "rule": {"aspect": 32, "head_dim": 16, "ffn_multiple": 16},
        "groups": [{"name": "g", "budgets": [2e9], "variants": ["dense"], "depths": [1, 2]}]}))
    manifest = tmp_path / "sweep.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "isoflop.py"), "plan", str(spec), "--out", str(manifest)],
                   check=True, capture_output=True, env=job_env())
    runs = json.loads(manifest.read_text())["runs"]
    assert len(runs) == 2
    sweep_dir = tmp_path / "sweep"
    env = {**job_env(), "MEGAMOD_SWEEP_DIR": str(sweep_dir), "SLURM_CONF": slurm_cluster.conf}

    def submit() -> str:
        out = subprocess.run(
            ["bash", str(REPO / "slurm" / "isoflop_submit.sh"), str(manifest), *SBATCH_TWO_CPU_TASKS,
             f"--output={tmp_path}/slurm-%A_%a.out"],
            capture_output=True, text=True, env=env, check=True, stdin=subprocess.DEVNULL).stdout
        m = re.search(r"submitted 2 runs of .* as job array (\d+)", out)
        assert m, out
        for index in range(2):
            job = slurm_cluster.wait(f"{m[1]}_{index}", JOB_TIMEOUT_S)
            assert job["JobState"] == "COMPLETED", (tmp_path / f"slurm-{m[1]}_{index}.out").read_text()
        return m[1]

    submit()
    for run in runs:
        assert max(loss_by_file(sweep_dir / run["name"])[-1]) == run["steps"]
        assert (sweep_dir / run["name"] / "isoflop_done.json").exists()
    table = (sweep_dir / "results.csv").read_text()
    assert all(run["name"] in table for run in runs) and len(table.splitlines()) == 3
    again = submit()
    for index, run in enumerate(runs):
        assert "is finished: skipped" in (tmp_path / f"slurm-{again}_{index}.out").read_text()
