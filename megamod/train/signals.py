"""Stopping cleanly: on SIGUSR1/SIGTERM or after a wall-clock limit, at a step boundary all ranks agree on.

Slurm sends the signal (`#SBATCH --signal=USR1@600` ahead of the time limit, `scancel --signal=USR1`
for a preemption, SIGTERM before a kill) to every task, but each rank sees it at a different point
of its step. The handler only sets a flag; `should_stop()`, called by every rank at every step
boundary, all-reduces the flags (MAX) so that all ranks stop after the same step, save one
consistent checkpoint and exit.

Only SIGUSR1 asks for a requeue (`wants_requeue`): it is the signal a job arranges to get before
its time limit or a preemption. SIGTERM is Slurm ending the job (scancel, the time limit itself,
a node going down): the ranks still checkpoint if KillWait gives them time, but the job is not
requeued, or `scancel` would bring it straight back. A requeued or resubmitted job resumes from
the newest complete checkpoint.

Install it first thing, before building the model and loading a checkpoint: until then SIGUSR1
keeps its default action, which kills the process, and the job fails instead of being requeued.

    stop = StopController(cfg.train.exit_after_minutes).install()
    ...  # build, resume
    for step in ...:
        train_step()
        if stop.should_stop():
            save_checkpoint(); dist.barrier()
            if rank == 0 and stop.wants_requeue:
                requeue_slurm_job()
            sys.exit(0)
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopController:
    """Owns the stop signals' handlers and the wall-clock limit; see the module docstring."""

    def __init__(
        self,
        exit_after_minutes: float | None,
        signals: Iterable[signal.Signals] = (signal.SIGUSR1, signal.SIGTERM),
        requeue_signals: Iterable[signal.Signals] = (signal.SIGUSR1,),
    ) -> None:
        if exit_after_minutes is not None and exit_after_minutes <= 0:
            raise ValueError(f"--train.exit_after_minutes must be positive, got {exit_after_minutes}")
        self.exit_after_minutes = exit_after_minutes
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.requeue_signals = frozenset(signal.Signals(s) for s in requeue_signals)
        self.reason: str | None = None  # set, identically on every rank, once should_stop() is True
        self.signum: int | None = None  # the agreed signal when a signal stopped the run
        self._start = time.monotonic()
        self._received: int = 0  # local: last signal number received, 0 for none
        self._previous: dict[signal.Signals, object] = {}

    # Handlers run in the main thread between bytecodes; they only record the signal (no I/O: a
    # print here can re-enter a print the main thread is in the middle of).
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received = max(self._received, signum)  # as across ranks: SIGTERM over SIGUSR1

    def install(self) -> StopController:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopController.install() must run in the main thread (Python's signal rule)")
        for s in self.signals:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> StopController:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self._start) / 60

    @property
    def by_signal(self) -> bool:
        """Whether the agreed stop came from a signal (rather than the time limit)."""
        return self.signum is not None

    @property
    def wants_requeue(self) -> bool:
        """Whether the agreed stop asks rank 0 to requeue the job: SIGUSR1 by default, see above."""
        return self.signum is not None and self.signum in self.requeue_signals

    def should_stop(self, group: dist.ProcessGroup | None = None) -> bool:
        """True on every rank of `group` (default WORLD) once any of them got a signal or passed the limit.

        Collective: every rank must call it at the same step boundaries. Cost: one all_reduce of
        two int32 (a host sync on NCCL); without an initialised process group it is local.
        """
        timed_out = self.exit_after_minutes is not None and self.elapsed_minutes >= self.exit_after_minutes
        flags = [self._received, int(timed_out)]
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
            t = torch.tensor(flags, dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flags = t.tolist()
        signum, timed_out = flags
        # A signal wins over the time limit, and of two signals the larger number (SIGTERM over
        # SIGUSR1): ending the job wins over requeueing it.
        if signum:
            self.signum = signum
            self.reason = f"signal {signal.Signals(signum).name}"
        elif timed_out:
            self.reason = f"time limit {self.exit_after_minutes} min"
        return self.reason is not None


def requeue_slurm_job() -> bool:
    """Rank 0 only: `scontrol requeue $SLURM_JOB_ID`; returns whether the job was requeued.

    Call it last, after the checkpoint is complete on every rank: Slurm ends the running job at
    once (SIGTERM, then SIGKILL after KillWait seconds) and puts it back in the queue, where it
    becomes eligible again after a delay (about two minutes in Slurm 22.05).
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("SLURM_JOB_ID=%s but scontrol is not on PATH: not requeued; resubmit the job to resume", job_id)
        return False
    try:
        r = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as e:
        log.warning("scontrol requeue %s failed (%s): resubmit the job to resume", job_id, e)
        return False
    if r.returncode != 0:
        # e.g. submitted with --no-requeue, or the cluster sets JobRequeue=0 and the job lacks --requeue
        log.warning("scontrol requeue %s failed: %s; resubmit the job to resume", job_id, r.stderr.strip())
        return False
    log.info("requeued Slurm job %s", job_id)
    return True
