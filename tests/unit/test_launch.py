"""discover_launch_env() on fake environments: no processes, no scontrol, no MPI."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from megamod.parallel import launch
from megamod.parallel.launch import LaunchEnv, LaunchError, discover_launch_env, first_slurm_host, tasks_on_node

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "n0", "MASTER_PORT": "29400"}

# Task 9 of `srun` over 2 nodes x 8 tasks in job 12345: the second task of the second node.
SLURM_STEP = {
    "SLURM_JOB_ID": "12345",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    """Host lists are expanded by the built-in parser unless a test fakes scontrol."""
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)


def test_torchrun():
    assert discover_launch_env(TORCHRUN) == LaunchEnv(3, 8, 1, 2, "n0", 29400, "torchrun")


def test_torchrun_without_local_world_size_assumes_one_node():
    env = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}
    assert discover_launch_env(env).local_world_size == 8


def test_torchrun_partial_names_what_is_missing():
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT"):
        discover_launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_torchrun_wins_over_slurm():
    # torchrun started inside an srun task: torchrun's variables describe this process.
    assert discover_launch_env({**SLURM_STEP, **TORCHRUN}).source == "torchrun"


def test_slurm_step():
    # port: 15000 + 12345 % 15000
    assert discover_launch_env(SLURM_STEP) == LaunchEnv(9, 16, 1, 8, "gpu007", 27345, "slurm")


def test_slurm_port_is_deterministic_per_job_and_overridable():
    other_rank = {**SLURM_STEP, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    assert discover_launch_env(other_rank).master_port == discover_launch_env(SLURM_STEP).master_port
    assert discover_launch_env({**SLURM_STEP, "SLURM_JOB_ID": "12346"}).master_port == 27346
    assert discover_launch_env({**SLURM_STEP, "SLURM_JOB_ID": "30000"}).master_port == 15000  # wraps below 30000
    overridden = discover_launch_env({**SLURM_STEP, "MASTER_PORT": "6000", "MASTER_ADDR": "10.0.0.1"})
    assert (overridden.master_addr, overridden.master_port) == ("10.0.0.1", 6000)


def test_slurm_master_is_first_host_of_the_step_not_the_job():
    env = {**SLURM_STEP, "SLURM_JOB_NODELIST": "gpu[001-008]"}  # srun -N2 inside an 8-node job
    assert discover_launch_env(env).master_addr == "gpu007"
    del env["SLURM_STEP_NODELIST"]
    assert discover_launch_env(env).master_addr == "gpu001"


def test_slurm_local_world_size_prefers_the_step_count():
    # `srun -n1` inside `sbatch --ntasks-per-node=2`: the step has 1 task per node, the job 2
    # (what Slurm 22.05 sets in that case).
    env = {
        **SLURM_STEP,
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1",
    }
    assert discover_launch_env(env).local_world_size == 1
    # Without the step's count the job's is all there is, and here it contradicts the step.
    del env["SLURM_STEP_TASKS_PER_NODE"]
    with pytest.raises(LaunchError, match="local world size 2 <= world size 1"):
        discover_launch_env(env)


def test_slurm_uneven_nodes():
    env = {**SLURM_STEP, "SLURM_NTASKS": "28", "SLURM_PROCID": "24", "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
           "SLURM_STEP_TASKS_PER_NODE": "8(x3),4", "SLURM_STEP_NODELIST": "a[1-4]"}
    assert discover_launch_env(env).local_world_size == 4


def test_slurm_batch_shell_is_not_a_rank():
    # The batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS, but no step id.
    batch = {k: v for k, v in SLURM_STEP.items() if k not in ("SLURM_STEP_ID",)}
    with pytest.raises(LaunchError, match="start the ranks with srun"):
        discover_launch_env(batch)
    assert discover_launch_env(batch, allow_single=True).source == "single"


def test_slurm_uses_scontrol_for_the_host_list(monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="gpu007\ngpu008\n", stderr="")

    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    assert discover_launch_env(SLURM_STEP).master_addr == "gpu007"
    assert calls == [["/usr/bin/scontrol", "show", "hostnames", "gpu[007-008]"]]


def test_scontrol_failure_is_reported(monkeypatch):
    def failing_run(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(launch.subprocess, "run", failing_run)
    with pytest.raises(LaunchError, match="scontrol show hostnames gpu"):
        discover_launch_env(SLURM_STEP)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu[003-005,9],login1", "gpu003"), ("node1,node2", "node1"), ("a-b[10-12]", "a-b10"), ("solo", "solo"),
     ("x[07]", "x07")],
)
def test_first_slurm_host_without_scontrol(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize(("spec", "node", "count"),
                         [("8", 0, 8), ("8(x3),4", 2, 8), ("8(x3),4", 3, 4), ("2,1(x2)", 2, 1)])
def test_tasks_on_node(spec, node, count):
    assert tasks_on_node(spec, node) == count


@pytest.mark.parametrize(("spec", "node"), [("8(x3),4", 4), ("8x3", 0), ("", 0)])
def test_tasks_on_node_rejects(spec, node):
    with pytest.raises(LaunchError):
        tasks_on_node(spec, node)


class FakeComm:
    """Just enough of mpi4py's Comm for one rank of a 4-rank, 2-node job."""

    def __init__(self, rank, size, bcast_value=None):
        self.rank, self.size, self.bcast_value, self.freed = rank, size, bcast_value, False

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, split_type, key):
        assert split_type == "SHARED"
        return FakeComm(self.rank % 2, 2)

    def Free(self):
        self.freed = True

    def bcast(self, value, root):
        assert root == 0
        return value if self.rank == 0 else self.bcast_value


def fake_mpi4py(monkeypatch, comm):
    mpi = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED="SHARED")
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)


def test_mpi_rank_gets_master_from_rank_0(monkeypatch):
    fake_mpi4py(monkeypatch, FakeComm(3, 4, bcast_value=("host0", 41000)))
    env = discover_launch_env({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"})
    assert env == LaunchEnv(3, 4, 1, 2, "host0", 41000, "mpi")


def test_mpi_rank_0_offers_its_host_and_a_port(monkeypatch):
    fake_mpi4py(monkeypatch, FakeComm(0, 4))
    monkeypatch.setattr(launch.socket, "gethostname", lambda: "host0")
    env = discover_launch_env({"PMI_SIZE": "4", "PMI_RANK": "0"})
    assert (env.rank, env.master_addr, env.source) == (0, "host0", "mpi")
    assert 0 < env.master_port < 65536
    env = discover_launch_env({"PMI_SIZE": "4", "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "7777"})
    assert (env.master_addr, env.master_port) == ("10.1.1.1", 7777)


def test_mpirun_inside_a_slurm_step_is_mpi(monkeypatch):
    # mpirun's daemons run as srun tasks, so the ranks inherit one daemon's SLURM_PROCID.
    fake_mpi4py(monkeypatch, FakeComm(3, 4, bcast_value=("host0", 41000)))
    env = {**SLURM_STEP, "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
           "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}
    assert discover_launch_env(env).source == "mpi"
    # srun --mpi=pmi2 sets PMI_* that agree with Slurm's: that is Slurm's launch.
    env = {**SLURM_STEP, "PMI_SIZE": "16", "PMI_RANK": "9"}
    assert discover_launch_env(env).source == "slurm"


def test_mpi_without_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` raise ImportError
    with pytest.raises(LaunchError, match="pip install mpi4py"):
        discover_launch_env({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})


def test_nothing_set_explains_how_to_launch():
    with pytest.raises(LaunchError) as e:
        discover_launch_env({})
    for launcher in ("torchrun", "srun", "mpirun"):
        assert launcher in str(e.value)


def test_single_process():
    env = discover_launch_env({}, allow_single=True)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (0, 1, 0, 1, "single")
    assert env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536
    env = discover_launch_env({"MASTER_ADDR": "h", "MASTER_PORT": "1234"}, allow_single=True)
    assert (env.master_addr, env.master_port) == ("h", 1234)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({**TORCHRUN, "RANK": "8"}, "rank 8 not in"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "local rank 2"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "not a TCP port"),
        ({**TORCHRUN, "WORLD_SIZE": "eight"}, "WORLD_SIZE='eight' is not an integer"),
        ({**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "8(x2"}, "tasks-per-node"),
    ],
)
def test_inconsistent_environments_fail_loudly(env, match):
    with pytest.raises(LaunchError, match=match):
        discover_launch_env(env)


def test_reads_os_environ_by_default(monkeypatch):
    for k in list(launch.os.environ):
        if k.startswith(("SLURM_", "OMPI_", "PMI", "MV2_")) or k in TORCHRUN:
            monkeypatch.delenv(k)
    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    assert discover_launch_env().rank == 3
    assert LaunchEnv(0, 1, 0, 1, "h", 1, "single").init_method == "tcp://h:1"


def test_describe():
    assert LaunchEnv(9, 16, 1, 8, "gpu007", 27345, "slurm").describe() == (
        "rank 9/16 (local 1/8) via slurm, master gpu007:27345"
    )
