"""The uninterrupted reference run that several fault tests compare with (once per session)."""

from __future__ import annotations

import pytest

from _faults import COMMON, launch, read_losses


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """2 ranks, ZeRO 1, the COMMON schedule, no fault (its samples recorded): (run dir, {step: loss})."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run = launch(run_dir, *COMMON, nproc=2, faults=[{"kind": "record_samples"}])
    assert run.rc == 0, run.text[-4000:]
    return run_dir, read_losses(run_dir)
