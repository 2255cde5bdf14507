"""Skipping bad steps: a non-finite loss or gradient on any rank (or, optionally, a loss spike)
skips the optimizer step on every rank, leaving weights and optimizer state bit for bit as they were.

The decision reaches every rank without a host sync, through collectives the step runs anyway:

- ``StepGuard.guard(loss)`` is the identity in the forward; its backward multiplies the incoming
  gradient by NaN when this micro-batch's loss is not finite (or spikes). One bad micro-batch on
  one rank so makes that rank's gradients NaN; the data-parallel reduction carries the NaN to
  every replica and the global gradient norm (reduced over TP × PP, and over the ZeRO partitions)
  is NaN on every rank. A NaN that arises in a gradient directly travels the same way.
- every optimizer path megamod builds skips a step whose global norm is not finite:
  ZeRO 0: ``ClippingAdamW`` and ``MasterAdamW`` skip inside their kernels (``found_inf``; the
  step count is not advanced), with no host sync; ZeRO 1-3 in fp32 and bf16: DeepSpeed's ZeRO
  and BF16 optimizers see an invalid norm, drop the gradients and return, and the engine counts
  ``skipped_steps`` and leaves the LR schedule where it was (ZeRO 1-2 tested in
  tests/faults/test_numerics.py; ZeRO 3 read in DeepSpeed 0.19.8's stage3.py, not tested). At
  ZeRO 0 DeepSpeed does not know, so the LR schedule advances over a skipped step there;
  weights, moments and step counts do not change.
- ``after_step(norm)`` counts skips on the device (total, current run, longest run since the last
  check); ``check()`` reads them at log intervals, where the loop syncs anyway, and raises
  ``TooManySkips`` once ``train.max_consecutive_skips`` steps in a row were skipped. The counts
  are the same on every rank (they come from the global norm), so every rank stops together.

The spike guard (``train.spike_sigma`` > 0) compares each micro-batch loss with mean + n·σ of the
same rank's last ``train.spike_window`` micro-batch losses (kept on the device; the window must be
full before it acts). Any rank's spike skips the step everywhere, as above.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class TooManySkips(RuntimeError):
    """``train.max_consecutive_skips`` optimizer steps in a row were skipped."""


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale`` (1, or NaN to poison it)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


class StepGuard:
    def __init__(self, device: torch.device, max_consecutive: int = 0, spike_sigma: float = 0.0,
                 spike_window: int = 100) -> None:
        self.max_consecutive, self.spike_sigma, self.spike_window = max_consecutive, spike_sigma, spike_window
        zero = lambda: torch.zeros((), dtype=torch.float32, device=device)  # noqa: E731
        self._total, self._run, self._longest = zero(), zero(), zero()  # skipped steps
        self._window = torch.zeros(spike_window if spike_sigma > 0 else 0, dtype=torch.float32, device=device)
        self._seen = 0  # micro-batch losses offered to the window (a host count: no sync)
        self.skipped = 0  # total at the last check, on the host

    # ---- per micro-batch ----------------------------------------------------------------------
    def guard(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: ``loss`` itself, whose gradient turns NaN when it is bad."""
        value = loss.detach().float()
        bad = ~torch.isfinite(value)
        if self.spike_sigma > 0:
            bad = bad | self._spike(value)
        scale = torch.where(bad, torch.full_like(value, math.nan), torch.ones_like(value))
        return _ScaleGrad.apply(loss, scale)

    def _spike(self, value: torch.Tensor) -> torch.Tensor:
        w = self._window
        full = self._seen >= len(w)
        spike = (value > w.mean() + self.spike_sigma * w.std()) if full else torch.zeros_like(value, dtype=torch.bool)
        slot = self._seen % len(w)
        w[slot] = torch.where(torch.isfinite(value), value, w[slot])  # a non-finite loss leaves the slot as it was
        self._seen += 1
        return spike

    # ---- per optimizer step -------------------------------------------------------------------
    def after_step(self, norm: Any) -> None:
        """``norm``: the engine's global gradient norm after the step (a device scalar, or a
        float: DeepSpeed reports inf for a step it skipped). Device ops only."""
        if norm is None:
            return
        if isinstance(norm, torch.Tensor):
            skipped = (~torch.isfinite(norm.detach())).to(self._total.device, torch.float32)
        else:
            skipped = float(not math.isfinite(float(norm)))
        self._total += skipped
        self._run = (self._run + 1) * skipped
        self._longest = torch.maximum(self._longest, self._run)

    def check(self, step: int) -> int:
        """At a log interval (a host sync): the total of skipped steps; raises ``TooManySkips``."""
        total, longest = (int(v) for v in torch.stack([self._total, self._longest]).tolist())
        self._longest.copy_(self._run)
        self.skipped = total
        if self.max_consecutive and longest >= self.max_consecutive:
            raise TooManySkips(
                f"{longest} optimizer steps in a row were skipped (non-finite loss or gradient"
                f"{', or a loss spike' if self.spike_sigma else ''}) by step {step}; stopping without saving "
                f"(--train.max_consecutive_skips {self.max_consecutive}). Resume from the last checkpoint with a "
                f"lower --optim.lr or a larger --optim.warmup_steps, or raise --train.max_consecutive_skips")
        return total

    # ---- checkpoints (per rank: the spike window holds this rank's losses) ----------------------
    def state_dict(self) -> dict[str, Any]:
        return {"total": self._total.cpu(), "run": self._run.cpu(), "window": self._window.cpu(), "seen": self._seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._total.copy_(state["total"])
        self._run.copy_(state["run"])
        self._longest.copy_(state["run"])
        if state["window"].shape == self._window.shape:  # the same spike settings as when saved
            self._window.copy_(state["window"])
            self._seen = state["seen"]
        self.skipped = int(state["total"])
