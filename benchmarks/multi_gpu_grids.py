"""The grids benchmarks/multi_gpu.py runs (its docstring says why these), and the batch every
correctness grid shares."""

from __future__ import annotations

import re
from dataclasses import dataclass

FLOORS = {"bf16": (1e-2, 2e-2), "fp32": (1e-5, 1e-4)}  # (step-1 bound, mean-over-steps bound), relative
MICRO, ACCUM = 2, 4  # correctness: global batch 8 sequences
# --tiny: the integration tests' model (4 layers so pp=4 fits), a few seconds per run on a CPU.
TINY = ["--model.n_layers", "4", "--model.d_model", "64", "--model.n_heads", "4", "--model.n_kv_heads", "4",
        "--model.ffn_hidden", "128", "--model.vocab_size", "512", "--train.seq_len", "32"]


@dataclass(frozen=True)
class Grid:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0  # 0: the flavour's YAML stage
    show_dp: bool = False  # scaling grids always name dp ("tp4-dp1"), apart from correctness's "tp4"
    cp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def name(self) -> str:
        parts = [f"{k}{v}" for k, v in (("tp", self.tp), ("cp", self.cp), ("pp", self.pp), ("dp", self.dp))
                 if v > 1 or (k == "dp" and self.show_dp)]
        return "-".join(parts or ["dp1"]) + (f"-z{self.zero}" if self.zero else "")

    @classmethod
    def parse(cls, name: str) -> "Grid":
        kv = {k: int(v) for k, v in re.findall(r"(tp|cp|pp|dp|z)(\d+)", name)}
        return cls(tp=kv.get("tp", 1), pp=kv.get("pp", 1), dp=kv.get("dp", 1), zero=kv.get("z", 0), cp=kv.get("cp", 1))


def correctness_grids(n: int, variant: str = "dense") -> list[Grid]:
    cp = [Grid(cp=c) for c in (2, 4, 8)]
    if variant == "moba":
        return cp
    mixed = [Grid(tp=2, pp=2)] if 4 <= n < 8 else []  # the tp2×pp2×dp2 where it won't fit
    return [Grid(tp=t) for t in (2, 4, 8)] + [Grid(pp=p) for p in (2, 4)] + mixed + [Grid(tp=2, pp=2, dp=2)] + cp


def scaling_grids(n: int) -> list[Grid]:
    sizes = [d for d in (1, 2, 4, 8, 16, 32) if d <= max(n, 8)]  # up to 8 shown, if skipped
    dp = [Grid(dp=d, zero=z) for z in (1, 2) for d in sizes if d > 1 or z == 1]  # dp 1 partitions nothing: one reference
    extra = [Grid(tp=t, dp=max(1, n // t), show_dp=True) for t in (2, 4)] \
        + [Grid(pp=2, dp=max(1, n // 2), show_dp=True)]
    return dp + [g for g in extra if g.world > 1]


def profile_grids(n: int) -> list[Grid]:
    return [Grid(tp=t, show_dp=True) for t in (2, 4)]


def default_resume(n: int, variant: str = "dense") -> str:
    if variant == "moba":
        return "cp8:cp4-dp2" if n >= 8 else "cp4:cp2-dp2" if n >= 4 else "cp2:dp2" if n >= 2 else "none"
    return "tp2-pp2-dp2:tp2-dp4" if n >= 8 else "tp2-pp2:tp2-dp2" if n >= 4 else "pp2:tp2" if n >= 2 else "none"

