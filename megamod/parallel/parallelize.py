"""Apply parallelism to the single-device model, from outside, in one fixed order.

Called on the meta-device model, before its weights exist (STYLE.md, item 4): each transform
swaps modules or drops layers, so a 2B model never materialises unsharded on one rank.
Order: tensor parallelism (swap linears/embedding, sequence-parallel regions) -> pipeline split
-> context parallelism (wraps the inner-attention seam).
"""

from __future__ import annotations

from megamod.config import Config
from megamod.model.gpt import GPT
from megamod.parallel.context import apply_cp
from megamod.parallel.dims import ParallelDims
from megamod.parallel.pipeline import apply_pp
from megamod.parallel.tensor import apply_tp, universal_checkpoint_info

def parallelize_model(model: GPT, cfg: Config, dims: ParallelDims) -> None:
    """In-place, on the meta device. Degree-1 dimensions are no-ops."""
    # 1. Tensor parallelism (+ sequence parallelism): swap linears/embedding for sharded ones.
    apply_tp(model, dims, sequence_parallel=cfg.parallel.sequence_parallel)
    # 2. Pipeline split: keep this stage's blocks (same names), embedding first, output last.
    apply_pp(model, cfg, dims)
    # 3. Context parallelism: every inner attention (dense or MoBA) becomes its CP version.
    apply_cp(model, dims, cfg)
    # How each parameter this rank holds is split, saved with every checkpoint (at tp=1 too), so
    # DeepSpeed's ds_to_universal can merge TP slices and a run can resume at another TP degree.
    # (Names only: the same before and after the swap; after the split, so a stage's patterns
    # name only its own parameters, which ds_to_universal's strict mode requires.)
    model.universal_checkpoint_info = universal_checkpoint_info(model)
