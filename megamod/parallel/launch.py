"""Where this process sits in the job: rank, world size, local rank and the rendezvous address.

Launchers are tried in a fixed order, the first that claims the process wins:

1. torchrun (or anything torchrun-compatible): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
   MASTER_ADDR, MASTER_PORT.
2. Slurm's srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, tasks on this node from
   SLURM_STEP_TASKS_PER_NODE, else SLURM_NTASKS_PER_NODE; the master is the first host of the step's
   node list (`scontrol show hostnames`), the port MASTER_PORT or one derived from SLURM_JOB_ID.
   Only a task that srun started counts (SLURM_STEP_ID is set): a batch script also carries
   SLURM_PROCID=0 and the job's SLURM_NTASKS, and a lone `python -m megamod.train` there would
   otherwise wait forever for ranks that were never started.
3. MPI (mpirun/mpiexec/hydra): mpi4py, imported only when the launcher's variables are present,
   because importing it initialises MPI. Rank 0 broadcasts its host name and a free port.
4. A single process when `allow_single` (on a free port unless MASTER_PORT is set); otherwise a
   `LaunchError` that says how to launch.

Nothing here initialises torch.distributed: the trainer does, with the returned address.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

LaunchSource = Literal["torchrun", "slurm", "mpi", "single"]

# Ports derived from SLURM_JOB_ID fall in [_PORT_BASE, _PORT_BASE + _PORT_SPAN): below Linux's
# ephemeral range (32768-60999), so an outgoing connection never holds the port we want, and
# deterministic, so every rank of a job (and the job again after a requeue) computes the same one.
_PORT_BASE = 15000
_PORT_SPAN = 15000

# Variables that mean "an MPI launcher started this process", per MPI implementation.
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")

_HOW_TO_LAUNCH = """\
no launcher found: set none of torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_ID) or MPI's (OMPI_COMM_WORLD_SIZE,
PMI_SIZE, ...) variables. Launch with one of:
  torchrun --nproc-per-node 2 -m megamod.train --config examples/configs/debug.yaml
  srun --ntasks-per-node 8 python -m megamod.train ...   (inside sbatch: see slurm/)
  mpirun -n 2 python -m megamod.train ...                (needs mpi4py)"""


class LaunchError(RuntimeError):
    """The environment does not say (consistently) how this process was launched."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: LaunchSource

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(f"{self.source}: rank {self.rank} not in [0, world size {self.world_size})")
        if not 0 <= self.local_rank < self.local_world_size <= self.world_size:
            raise LaunchError(
                f"{self.source}: need 0 <= local rank {self.local_rank} < local world size "
                f"{self.local_world_size} <= world size {self.world_size}"
            )
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"{self.source}: master port {self.master_port} is not a TCP port")

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"

    def describe(self) -> str:
        """One log line per rank, e.g. "rank 9/16 (local 1/8) via slurm, master gpu007:27345"."""
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) "
                f"via {self.source}, master {self.master_addr}:{self.master_port}")


def discover_launch_env(environ: Mapping[str, str] | None = None, allow_single: bool = False) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "SLURM_PROCID" in env and _slurm_step(env) and not _mpirun_inside_slurm(env):
        return _from_slurm(env)
    if any(v in env for v in _MPI_SIZE_VARS):
        return _from_mpi(env)
    if allow_single:
        # A free port, not a fixed default: two single-process runs may share a node.
        port = _int(env, "MASTER_PORT", 0) or _free_port()
        return LaunchEnv(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")
    hint = ""
    if "SLURM_PROCID" in env:
        hint = "\n(this looks like a Slurm batch script: start the ranks with srun, not directly)"
    raise LaunchError(_HOW_TO_LAUNCH + hint)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    missing = [v for v in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise LaunchError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} are not (launch with torchrun)")
    world = _int(env, "WORLD_SIZE")
    # LOCAL_WORLD_SIZE is torchrun's; a hand-rolled launcher may omit it: assume one node.
    return LaunchEnv(
        rank=_int(env, "RANK"),
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK"),
        local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
        master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT"),
        source="torchrun",
    )


# ---------------------------------------------------------------------------------------- Slurm


def _slurm_step(env: Mapping[str, str]) -> bool:
    # The batch step has no SLURM_STEP_ID; srun's tasks have it (older Slurm: SLURM_STEPID).
    return "SLURM_STEP_ID" in env or "SLURM_STEPID" in env


def _mpirun_inside_slurm(env: Mapping[str, str]) -> bool:
    # mpirun inside an allocation starts its ranks with the step's Slurm variables inherited from
    # one orted/prted daemon per node, so SLURM_PROCID is that daemon's, not the rank's.
    for size_var, rank_var in zip(_MPI_SIZE_VARS, _MPI_RANK_VARS, strict=True):
        if size_var in env and rank_var in env:
            return (env[size_var], env[rank_var]) != (env.get("SLURM_NTASKS"), env.get("SLURM_PROCID"))
    return False


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    world = _int(env, "SLURM_NTASKS")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    elif nodelist:
        # Rank 0 runs on the first node of the step (srun's block distribution); the step's list
        # rather than the job's, so `srun -N1` inside a larger allocation still finds it.
        master_addr = first_slurm_host(nodelist)
    else:
        raise LaunchError("under srun but SLURM_STEP_NODELIST/SLURM_JOB_NODELIST is not set; set MASTER_ADDR")
    if "MASTER_PORT" in env:
        master_port = _int(env, "MASTER_PORT")
    else:
        master_port = _PORT_BASE + _int(env, "SLURM_JOB_ID") % _PORT_SPAN
    return LaunchEnv(
        rank=_int(env, "SLURM_PROCID"),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID"),
        local_world_size=_slurm_local_world_size(env),
        master_addr=master_addr,
        master_port=master_port,
        source="slurm",
    )


def _slurm_local_world_size(env: Mapping[str, str]) -> int:
    # The step's own count first: SLURM_NTASKS_PER_NODE is the job's and srun steps inherit it,
    # so `srun -n1` inside an `--ntasks-per-node=2` job still reads 2 there (Slurm 22.05).
    # Counts are compressed per node, e.g. "8(x3),4": 8 on nodes 0-2, 4 on node 3.
    if "SLURM_STEP_TASKS_PER_NODE" in env:
        return tasks_on_node(env["SLURM_STEP_TASKS_PER_NODE"], _int(env, "SLURM_NODEID", 0))
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    if "SLURM_TASKS_PER_NODE" in env:
        return tasks_on_node(env["SLURM_TASKS_PER_NODE"], _int(env, "SLURM_NODEID", 0))
    raise LaunchError("under srun but none of SLURM_STEP_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE is set")


def tasks_on_node(spec: str, node_id: int) -> int:
    """Tasks on node `node_id` from Slurm's compressed count list, e.g. "8(x3),4"."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot parse Slurm tasks-per-node {spec!r}")
        counts += [int(m[1])] * int(m[2] or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchError(f"SLURM_NODEID={node_id} but tasks-per-node {spec!r} lists {len(counts)} nodes")
    return counts[node_id]


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm host list ("gpu[003-005,9],login1" -> "gpu003")."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
        except (subprocess.SubprocessError, OSError) as e:
            raise LaunchError(f"`scontrol show hostnames {nodelist}` failed: {e}") from None
        if out:
            return out[0]
        raise LaunchError(f"`scontrol show hostnames {nodelist}` printed no host")
    # No Slurm client on this host (e.g. a container started by srun): the first host alone is
    # easy to expand by hand, keeping zero padding.
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise LaunchError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = m[1], m[2]
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


# ------------------------------------------------------------------------------------------ MPI


def _from_mpi(env: Mapping[str, str]) -> LaunchEnv:
    try:
        from mpi4py import MPI  # importing initialises MPI
    except ImportError:
        raise LaunchError("an MPI launcher started this process but mpi4py is missing: pip install mpi4py") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)  # the ranks sharing this host's memory
    local_rank, local_world = node.Get_rank(), node.Get_size()
    node.Free()
    addr_port = None
    if rank == 0:
        addr_port = (env.get("MASTER_ADDR") or socket.gethostname(), _int(env, "MASTER_PORT", 0) or _free_port())
    master_addr, master_port = comm.bcast(addr_port, root=0)
    return LaunchEnv(rank, world, local_rank, local_world, master_addr, master_port, "mpi")


def _free_port() -> int:
    # The port is released before torch binds it; another process could take it in between, which
    # is unlikely enough on a training node and then fails loudly in init_process_group.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
