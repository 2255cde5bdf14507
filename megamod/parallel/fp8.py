"""FP8 training of the block linears (train.fp8), through torchao's float8 training, applied from
outside after the model is built and parallelised, before activation checkpointing and
torch.compile (torchtitan's order: the float8 swap, then the other transforms).

What runs in FP8: the seven linears of every block, attention ``wq wk wv wo`` and feed-forward
``w1 w2 w3`` (``FP8_LINEARS``), dense and Mixture-of-Depths routed blocks alike, MoBA or dense
attention. Each product casts its input, weight and output gradient to float8 (e4m3 forward; the
tensorwise recipe takes e5m2 for the output gradient) with dynamic scales computed from the
tensors themselves every step, multiplies in ``torch._scaled_mm`` and returns the high-precision
dtype. The output projection (the logits), the MoD router and predictor, the embedding and the
norms stay bf16: they are small products or precision-sensitive ones, as in torchtitan's and
Megatron's recipes.

- ``tensorwise``: one scale per tensor (the faster, torchao's default recipe);
- ``rowwise``: one scale per row of the input and of the output gradient and per column of the
  weight, e4m3 throughout (the more accurate).

Checkpoints do not change: the weights stay bf16/fp32 parameters under the same names, and the
scales are recomputed from the tensors at every step (dynamic scaling: torchao keeps no amax
history or scale buffers), so there is no FP8 state to save or resume, and a run can resume with
FP8 switched on or off.

Tensor parallelism: the column/row-parallel linears (tp_layers.py) are not ``nn.Linear``, so
torchao's swap passes over them; their class is swapped here instead (as routed_sp.py swaps a
routed block's), to a subclass whose ``local_linear`` (this rank's product, no communication) is
torchao's float8 matmul. Every rank scales its own shard: the weight shard, and the input and
output gradient as this rank holds them (replicated or sharded on the feature dimension). Local
scales are at least as fine-grained as one global scale, so no amax is all-reduced (torchtitan's
DTensor path reduces it; that buys nothing here but a collective per product).
"""

from __future__ import annotations

import fnmatch
import importlib.util

import torch
from torch import nn

from megamod.config import ConfigError
from megamod.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear

FP8_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_PATTERNS = tuple(f"layers.*.{name}" for name in FP8_LINEARS)


def is_fp8_linear(name: str) -> bool:
    """Whether the module called ``name`` (a ``named_modules()`` name) runs in FP8."""
    return any(fnmatch.fnmatchcase(name, p) for p in _PATTERNS) and name.count(".") == 3


def check_fp8_support(device: torch.device) -> None:
    """Refuse a device or an environment where FP8 training cannot run (ConfigError, one line
    naming the fix). FP8 tensor cores start at compute capability 8.9 (Ada; Hopper is 9.0)."""
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("--train.fp8 needs torchao (torch's float8 training library): pip install "
                          "'megamod[fp8]' (torchao 0.17), or set --train.fp8 off")
    if device.type != "cuda":
        raise ConfigError(f"--train.fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, "
                          f"Hopper or newer); this run is on {device.type}: set --train.fp8 off")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ConfigError(f"--train.fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper or newer); "
                          f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: set --train.fp8 off")


class _Float8Local:
    """The FP8 local product for a TP linear: torchao's float8 matmul (what ``Float8Linear.forward``
    calls) on this rank's weight shard. ``init_fp8`` takes the matmul settings from a
    ``Float8Linear`` of the shard's shape built on the meta device, so they are torchao's own."""

    weight: nn.Parameter

    def init_fp8(self, config) -> None:
        from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args

        out, d_in = self.weight.shape
        ref = Float8Linear.from_float(nn.Linear(d_in, out, bias=False, device="meta"), config=config)
        self.fp8_config, self.linear_mm_config = config, ref.linear_mm_config
        self._fp8_matmul = matmul_with_hp_or_float8_args

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled():  # as Float8Linear does: the output in autocast's dtype
            x = x.to(torch.get_autocast_dtype("cuda"))
        return self._fp8_matmul.apply(x, self.weight.t(), self.linear_mm_config, self.fp8_config)


class Float8ColumnParallelLinear(_Float8Local, ColumnParallelLinear):
    pass


class Float8RowParallelLinear(_Float8Local, RowParallelLinear):
    pass


_TP_FP8 = {ColumnParallelLinear: Float8ColumnParallelLinear, RowParallelLinear: Float8RowParallelLinear}


def apply_fp8(model: nn.Module, recipe: str) -> list[str]:
    """Swap every block linear (``FP8_LINEARS``) for its FP8 version, in place: ``nn.Linear`` through
    torchao's ``convert_to_float8_training``, the TP linears by a class swap. Parameters, their
    names, tags and hooks are untouched. Returns the names swapped; ``recipe`` "off" swaps none.
    Raises if a block linear was not swapped (a renamed or new linear kind must not silently
    train in bf16)."""
    if recipe == "off":
        return []
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(model, module_filter_fn=lambda _, fqn: is_fp8_linear(fqn), config=config)
    for name, module in model.named_modules():
        if is_fp8_linear(name) and type(module) in _TP_FP8:
            module.__class__ = _TP_FP8[type(module)]
            module.init_fp8(config)
    swapped = [n for n, m in model.named_modules() if is_fp8_linear(n)]
    fp8_types = (Float8Linear, *_TP_FP8.values())
    missed = [n for n in swapped if not isinstance(model.get_submodule(n), fp8_types)]
    n_layers = len(getattr(model, "layers", {}))
    if missed or len(swapped) != len(FP8_LINEARS) * n_layers:
        raise ValueError(f"FP8: block linears left in high precision: {missed or 'some layers lack the names '}"
                         f"{list(FP8_LINEARS)}; module names changed?")
    return swapped
