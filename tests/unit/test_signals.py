"""StopController on one process (no process group): signals to self, the time limit; requeue_slurm_job."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from megamod.train import signals
from megamod.train.signals import StopController, requeue_slurm_job


@pytest.fixture
def clock(monkeypatch):
    """A fake monotonic clock in seconds, advanced by the test."""
    now = [1000.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: now[0])
    return now


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_self_stops_with_the_signal_as_reason(sig):
    with StopController(exit_after_minutes=None) as stop:
        assert not stop.should_stop()
        assert stop.reason is None and not stop.by_signal
        os.kill(os.getpid(), sig)  # the handler runs before os.kill returns to Python code
        assert stop.should_stop()
        assert stop.should_stop()  # stays stopped
    assert stop.reason == f"signal {sig.name}"
    assert stop.by_signal and stop.signum == sig
    # USR1 is the "checkpoint and come back" request; TERM is Slurm ending the job (scancel,
    # time limit), which a requeue would undo.
    assert stop.wants_requeue == (sig == signal.SIGUSR1)


@pytest.mark.parametrize("order", [(signal.SIGUSR1, signal.SIGTERM), (signal.SIGTERM, signal.SIGUSR1)])
def test_sigterm_wins_over_sigusr1_in_any_order(order):
    # scancel during a requeue request: the job must end, not come back.
    with StopController(None) as stop:
        for sig in order:
            os.kill(os.getpid(), sig)
        assert stop.should_stop()
    assert stop.reason == "signal SIGTERM" and not stop.wants_requeue


def test_uninstall_restores_previous_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        stop = StopController(None).install()
        stop.install()  # twice is harmless: the original handler is still what uninstall restores
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == []
        stop.uninstall()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_only_the_given_signals_are_handled():
    with StopController(None, signals=(signal.SIGUSR2,), requeue_signals=(signal.SIGUSR2,)) as stop:
        assert signal.getsignal(signal.SIGUSR1) is not stop._on_signal
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.should_stop() and stop.reason == "signal SIGUSR2" and stop.wants_requeue


def test_time_limit(clock):
    stop = StopController(exit_after_minutes=30)
    clock[0] += 30 * 60 - 1
    assert not stop.should_stop()
    clock[0] += 1
    assert stop.should_stop()
    assert stop.reason == "time limit 30 min"
    assert not stop.by_signal and not stop.wants_requeue


def test_signal_wins_over_time_limit(clock):
    with StopController(exit_after_minutes=1) as stop:
        clock[0] += 120
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop()
    assert stop.reason == "signal SIGUSR1" and stop.by_signal


def test_no_limit_never_times_out(clock):
    stop = StopController(exit_after_minutes=None)
    clock[0] += 10**9
    assert not stop.should_stop()


def test_rejects_non_positive_limit():
    with pytest.raises(ValueError, match="--train.exit_after_minutes"):
        StopController(exit_after_minutes=0)


def test_install_outside_main_thread_fails():
    errors = []
    t = threading.Thread(target=lambda: errors.append(_try_install()))
    t.start()
    t.join()
    assert errors and isinstance(errors[0], RuntimeError) and "main thread" in str(errors[0])


def _try_install():
    try:
        StopController(None).install()
    except RuntimeError as e:
        return e
    return None


def test_requeue_outside_slurm_does_nothing(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(signals.subprocess, "run", lambda *a, **k: pytest.fail("must not run scontrol"))
    assert requeue_slurm_job() is False


def test_requeue_runs_scontrol(monkeypatch):
    calls = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(signals.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(
        signals.subprocess, "run", lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", "")
    )
    assert requeue_slurm_job() is True
    assert calls == [["/usr/bin/scontrol", "requeue", "4242"]]


def test_requeue_failure_is_reported_not_raised(monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(signals.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(
        signals.subprocess,
        "run",
        lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "Requested operation is presently disabled"),
    )
    assert requeue_slurm_job() is False
    assert "presently disabled" in caplog.text and "resubmit" in caplog.text
    monkeypatch.setattr(signals.shutil, "which", lambda name: None)
    assert requeue_slurm_job() is False
    assert "scontrol is not on PATH" in caplog.text
