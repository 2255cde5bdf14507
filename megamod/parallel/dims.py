"""The rank grid: world = tp × cp × dp × pp, tp varying fastest (Megatron's order).

TP fastest keeps tensor-parallel groups inside a node (NVLink); PP slowest lets pipeline stages
span nodes, where only activations cross. ``ParallelDims`` is built once from the config, owns
every process group, and is passed explicitly; it is also the ``mpu`` object DeepSpeed takes.
What DeepSpeed 0.19 does with each (engine.py, zero/stage_1_and_2.py, runtime/utils.py):

    tensor-model-parallel   = TP: rank and size; ``is_model_parallel_parameter`` params are
                              counted on every TP rank, replicated ones only on TP rank 0
    model-parallel group    = TP × PP: grad norms and overflow flags are summed / maxed over it
                              (DeepSpeed's own PipelineParallelGrid does the same: a norm must
                              include every stage); rank and size stay TP's (they name the
                              mp_rank_XX checkpoint files, and Megatron's legacy API does this)
    data-parallel           = DP
    sequence-parallel       = CP
    sequence-data-parallel  = DP × CP: ZeRO partitions optimizer state and averages gradients
                              over it (this, not the DP group, is ZeRO's ``dp_process_group``)
    pipe-parallel           = 1 (size; the group is PP's): megamod runs one DeepSpeed engine per
                              pipeline stage (parallel/pipeline.py), so to DeepSpeed each stage is
                              a whole model. It reads the size only to label checkpoints, and a
                              stage's files must read as pp=1 for ds_to_universal to convert them

The grid arithmetic (``coords``, ``group_ranks``) is pure, so it is unit-tested for large worlds
without processes; ``build_groups`` is the only part that touches torch.distributed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

ORDER = ("tp", "cp", "dp", "pp")  # fastest-varying first


@dataclass
class ParallelDims:
    tp: int
    cp: int
    dp: int
    pp: int
    rank: int = 0
    groups: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ORDER:
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelDims: {name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ParallelDims: rank {self.rank} outside the grid of {self.world_size} ranks {self.sizes()}")

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ORDER}

    def coords(self, rank: int | None = None) -> dict[str, int]:
        """rank -> {tp, cp, dp, pp} coordinates."""
        r = self.rank if rank is None else rank
        out = {}
        for name in ORDER:
            size = getattr(self, name)
            out[name] = r % size
            r //= size
        return out

    def rank_of(self, **coords: int) -> int:
        r, stride = 0, 1
        for name in ORDER:
            r += coords.get(name, 0) * stride
            stride *= getattr(self, name)
        return r

    def group_ranks(self, dims: tuple[str, ...]) -> list[list[int]]:
        """All groups that vary along ``dims`` with the other coordinates fixed, each sorted."""
        fixed = [d for d in ORDER if d not in dims]
        groups = []
        for fixed_vals in itertools.product(*(range(getattr(self, d)) for d in fixed)):
            base = dict(zip(fixed, fixed_vals))
            ranks = sorted(self.rank_of(**base, **dict(zip(dims, vals)))
                           for vals in itertools.product(*(range(getattr(self, d)) for d in dims)))
            groups.append(ranks)
        return sorted(groups)

    # The groups megamod uses, by name -> the grid dimensions they span.
    GROUPS = {"tp": ("tp",), "cp": ("cp",), "dp": ("dp",), "pp": ("pp",), "dp_cp": ("cp", "dp"),
              "tp_cp": ("tp", "cp"), "mp": ("tp", "pp")}

    def group_of(self, name: str, rank: int | None = None) -> list[int]:
        """The ranks of group ``name`` that contain ``rank`` (pure arithmetic)."""
        r = self.rank if rank is None else rank
        return next(g for g in self.group_ranks(self.GROUPS[name]) if r in g)

    def build_groups(self, timeout: timedelta | None = None) -> None:
        """Create every process group once, in the same order on every rank (a collective).
        ``timeout``: how long a collective of these groups waits for a peer (torch's default for
        the backend otherwise, not the world group's)."""
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"the grid {self.sizes()} needs {self.world_size} ranks, but the process group has "
                             f"{dist.get_world_size()}; change --parallel.* or the number of processes")
        for name, dims in self.GROUPS.items():
            for ranks in self.group_ranks(dims):
                g = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    self.groups[name] = g
        # Control plane (stop requests, tag agreement) on gloo/CPU, off the GPU stream.
        self.groups["control"] = dist.new_group(list(range(self.world_size)), backend="gloo", timeout=timeout)

    def group(self, name: str) -> Any:
        return self.groups[name]

    # ---- the mpu interface DeepSpeed calls -----------------------------------------------------
    def get_model_parallel_group(self):
        return self.groups["mp"]  # TP × PP: see the module docstring

    def get_model_parallel_rank(self) -> int:
        return self.coords()["tp"]

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.groups["tp"]

    def get_tensor_model_parallel_rank(self) -> int:
        return self.coords()["tp"]

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.group_of("tp")[0]

    def get_data_parallel_group(self):
        return self.groups["dp"]

    def get_data_parallel_rank(self) -> int:
        return self.coords()["dp"]

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.group_of("dp")

    def get_sequence_parallel_group(self):
        return self.groups["cp"]

    def get_sequence_parallel_rank(self) -> int:
        return self.coords()["cp"]

    def get_sequence_parallel_world_size(self) -> int:
        return self.cp

    def get_sequence_data_parallel_group(self):
        return self.groups["dp_cp"]

    def get_sequence_data_parallel_rank(self) -> int:
        c = self.coords()
        return c["dp"] * self.cp + c["cp"]

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dp * self.cp

    def get_pipe_parallel_group(self):
        return self.groups["pp"]

    def get_pipe_parallel_rank(self) -> int:
        return self.coords()["pp"]

    def get_pipe_parallel_world_size(self) -> int:
        return 1  # one engine per stage: see the module docstring (use ``self.pp`` for the degree)
