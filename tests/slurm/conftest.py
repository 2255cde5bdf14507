"""A one-node Slurm cluster for the session (tests/slurm/cluster.sh) and helpers to drive jobs on it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _run(cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


@dataclass
class SlurmCluster:
    conf: str

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.conf, **extra}

    def sbatch(self, script: Path, args: Sequence[str], options: Sequence[str], env: Mapping[str, str]) -> str:
        out = _run(["sbatch", "--parsable", *options, str(script), *args], env={**env, "SLURM_CONF": self.conf})
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = _run(["scontrol", "show", "job", "-o", job_id], env=self.env())
        fields = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def signal(self, job_id: str, sig: str, *options: str) -> None:
        _run(["scancel", f"--signal={sig}", *options, job_id], env=self.env())

    def wait(self, job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
        """Wait for the job to end; a requeued job is made eligible at once.

        Slurm holds a requeued batch job back for ~2 minutes (BeginTime = requeue + 120 s in
        22.05) before it may start again; the test moves that to 2 s from now instead of waiting
        it out. Not to now: slurmd refuses a job credential issued in the same second as the one
        the requeue revoked ("Killing non-startable batch job: Job credential revoked"), and the
        job then ends FAILED instead of running again.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in TERMINAL_STATES:
                return job
            if job["JobState"] == "PENDING" and job.get("Reason") == "BeginTime" and int(job["Restarts"]) > 0:
                _run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"], env=self.env())
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], env=self.env(), check=False)
        tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
        pytest.fail(f"job {job_id} did not finish in {timeout:.0f}s: {self.job(job_id)}\n--- log tail ---\n{tail}")

    def wait_requeued(self, job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
        """Wait until the job has been requeued (and is pending again); fail if it ends instead."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if int(job["Restarts"]) > 0 and job["JobState"] == "PENDING":
                return job
            if job["JobState"] in TERMINAL_STATES:
                tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
                pytest.fail(f"job {job_id} ended ({job['JobState']}) without a requeue:\n{tail}")
            time.sleep(0.3)
        subprocess.run(["scancel", job_id], env=self.env(), check=False)
        pytest.fail(f"job {job_id} was not requeued in {timeout:.0f}s: {self.job(job_id)}")

    def wait_for_line(self, job_id: str, log: Path, predicate, timeout: float, until_ended: bool = True) -> str:
        """Wait until a line of `log` satisfies predicate; return it. Fails early if the job ends
        first, unless until_ended is False (a line written while the job is being torn down)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists():
                for line in log.read_text().splitlines():
                    if predicate(line):
                        return line
            job = self.job(job_id)
            if until_ended and job["JobState"] in TERMINAL_STATES:
                tail = log.read_text()[-4000:] if log.exists() else "(no log)"
                pytest.fail(f"job {job_id} ended ({job['JobState']}) before the awaited line:\n{tail}")
            time.sleep(0.2)
        pytest.fail(f"job {job_id}: awaited line not in {log} after {timeout:.0f}s")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Starts the cluster unless it is already up, and stops it afterwards only if it started it."""
    def cluster_sh(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER_SH), command], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=900)

    was_up = cluster_sh("status").returncode == 0
    r = cluster_sh("start")  # installs slurm-wlm and munge first if they are missing
    if r.returncode != 0:
        pytest.fail(f"the Slurm test cluster did not start (bash {CLUSTER_SH} start):\n{r.stdout}\n{r.stderr}")
    conf = _run(["bash", str(CLUSTER_SH), "env"]).strip().removeprefix("export SLURM_CONF=")
    yield SlurmCluster(conf=conf)
    if not was_up:
        cluster_sh("stop")
