"""Nothing trained is lost, nothing bad is loaded: a save that fails, checkpoints damaged later,
and a rank killed while the newest save had failed.

One story on 2 ranks under torchrun (the reference's schedule: a checkpoint every 4 steps):

1. The disk fills while rank 1 writes its first file of step 16 (inject.py: half the bytes, then
   ENOSPC), with --checkpoint.on_save_error stop: the ranks agree and exit 5, one line naming
   rank 1, the file and the errno; the partial tag is gone and `latest` still says step 12.
2. Later damage: one byte of step 12's rank-0 optimizer shard flipped, step 8's model file cut
   to half. With --checkpoint.fallback false resume refuses, naming the file.
3. A plain resume under torchrun --max-restarts 1 names both files and falls back to step 4; a
   second full disk (rank 0, step 20, default on_save_error continue) is reported and training
   goes on; then rank 1 is SIGKILLed mid-step 22: rank 0 names it within the collective timeout
   (+30 s) and exits 3, torchrun restarts both, and they resume from step 16, the newest complete
   checkpoint (20 failed). Every loss from step 5 to 24 equals the uninterrupted reference's, bit
   for bit.
"""
from __future__ import annotations

import pytest

from _faults import COMMON, TIMEOUT_S, exit_of, launch, note, read_losses
from megamod.train.checkpoint import CheckpointError, choose_resume_tag


def test_a_run_survives_a_full_disk_damaged_checkpoints_and_a_killed_rank(reference, tmp_path):
    _, ref = reference
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"

    # 1. a full disk in the middle of a file
    run = launch(run_dir, *COMMON, "--checkpoint.on_save_error", "stop", nproc=2,
                 faults=[{"kind": "enospc", "rank": 1, "tag": "step_00000016"}])
    assert run.rc != 0
    assert "checkpoint" in run.text and "step_00000016 was not saved (rank 1:" in run.text, run.text[-4000:]
    assert "[Errno 28] No space left on device" in run.text and run.text.count("was not saved") == 1
    assert exit_of(run_dir, 0)["rc"] == 5  # (rank 1 may get torchrun's SIGTERM before its own exit)
    assert not (ckpts / "step_00000016").exists()
    assert (ckpts / "latest").read_text() == "step_00000012"
    got = read_losses(run_dir)
    assert [got[s] for s in range(1, 17)] == [ref[s] for s in range(1, 17)]

    # 2. damage found later, and a user who forbids the fallback
    shard = ckpts / "step_00000012" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    model = ckpts / "step_00000008" / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    with open(model, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError) as refused:  # what resume runs first, here without a process group
        choose_resume_tag(str(ckpts), check=True, fallback=False)
    assert str(refused.value).startswith(f"checkpoint {ckpts}/step_00000012 is damaged: {shard}: CRC-32")
    assert "--checkpoint.fallback true" in str(refused.value)  # (CheckpointError exits 2: cli.py)

    # 3. resume: fall back past both, train through another failed save, survive a killed rank
    run = launch(run_dir, *COMMON, nproc=2, max_restarts=1,
                 faults=[{"kind": "enospc", "rank": 0, "tag": "step_00000020"}, {"kind": "kill", "rank": 1, "step": 22}])
    assert run.rc == 0, run.text[-4000:]
    assert f"{shard}: CRC-32" in run.text
    assert f"{model}: {size // 2} bytes, the manifest says {size}" in run.text
    assert run.text.count("falling back to the previous complete checkpoint") == 2
    assert "resumed from" in run.text and "step_00000004 at step 4" in run.text
    assert "step_00000020 was not saved (rank 0:" in run.text and "training goes on" in run.text
    named = run.first("[rank 0] rank 1 stopped responding")
    assert named is not None and named[0] - note(run_dir, "kill", 1)["time"] <= TIMEOUT_S + 30, run.text[-4000:]
    survivor = exit_of(run_dir, 0, attempt=0)
    assert survivor is not None and survivor["rc"] == 3  # EXIT_PEER_FAILED
    assert "step_00000016 at step 16" in run.text  # the restart: the newest complete checkpoint, not 20
    assert (ckpts / "latest").read_text() == "step_00000024"  # (the restarted attempt saved 20 again)
    got = read_losses(run_dir)  # the last value logged for each step: the restarted attempt's
    assert [got[s] for s in range(5, 25)] == [ref[s] for s in range(5, 25)]
