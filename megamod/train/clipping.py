"""Clipping by the global gradient norm inside the optimizer step, with no host sync: the rule
both of megamod's own optimizers follow (``ClippingAdamW`` here, ``MasterAdamW`` in
master_adamw.py), used where DeepSpeed hands the optimizer whole gradients (ZeRO 0).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def clip_and_skip(norm: torch.Tensor, max_norm: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """From the global gradient norm (a device scalar): the divisor that clips the gradients
    (DeepSpeed's rule, grads / max(1, (‖g‖ + 1e-6)/max_norm); None when max_norm is 0, no
    clipping) and the fused kernels' skip flag (1.0 where the norm is not finite). No host sync."""
    divisor = ((norm + 1e-6) / max_norm).clamp(min=1.0) if max_norm > 0 else None
    return divisor, (~torch.isfinite(norm)).float()


class ClippingAdamW(torch.optim.AdamW):
    """Fused AdamW that clips by the global gradient norm inside its own kernel.

    The fused kernels divide every gradient by ``grad_scale`` and skip the whole update where
    ``found_inf`` is nonzero (the GradScaler interface), both read on the device: clipping costs
    one foreach norm over the gradients and no extra pass or host sync, and a non-finite norm
    skips the step instead of writing NaN into the weights. ``_global_grad_norm`` (a device
    scalar) is where DeepSpeed's engine looks for the norm it reports.

    Under TP and PP (``norm_group``: the model-parallel group, TP × PP) the squared norm is summed
    over the group with TP-replicated parameters counted on TP rank 0 only (``count_replicated``)
    and TP-sharded ones (``tensor_model_parallel``) everywhere: DeepSpeed's own rule, one device
    reduction and still no host sync.
    """

    def __init__(self, params, *, max_norm: float, norm_group=None, count_replicated: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(params, fused=True, **kwargs)
        self.max_norm = max_norm
        self.norm_group, self.count_replicated = norm_group, count_replicated
        self._global_grad_norm: torch.Tensor | None = None

    def _norm(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
        if self.norm_group is None:
            return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        counted = [g for g, p in zip(grads, params) if self.count_replicated or getattr(p, "tensor_model_parallel", False)]
        sq = (torch.nn.utils.get_total_norm(counted, 2.0, foreach=True) ** 2 if counted
              else grads[0].new_zeros((), dtype=torch.float32))
        dist.all_reduce(sq, group=self.norm_group)
        return sq.sqrt()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if any("master" in st for st in state_dict["state"].values()):
            # Loading it would keep only the module file's bf16 copies of the weights.
            raise ValueError("this checkpoint holds fp32 master weights in its optimizer state (written with "
                             "--train.bf16_mode master_fused); resume it with --train.bf16_mode master_fused on one "
                             "rank at --optim.zero_stage 0, or start a new --train.run_dir")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if grads:
            norm = self._norm(grads, params)
            self._global_grad_norm = norm
            self.grad_scale, self.found_inf = clip_and_skip(norm, self.max_norm)
        return super().step(closure)
