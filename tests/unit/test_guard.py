"""The step guard on one process: which losses poison the gradient, counting, the K-skip stop."""

from __future__ import annotations

import math

import pytest
import torch

from megamod.train.guard import StepGuard, TooManySkips


def _grad(guard: StepGuard, value: float) -> float:
    """d guard(w·value) / dw: ``value`` (in float32) when the guard lets it through, else NaN."""
    w = torch.tensor(2.0, requires_grad=True)
    loss = w * value  # d loss / d w = value
    out = guard.guard(loss)
    assert out.item() == loss.item() or math.isnan(loss.item())  # the forward value is untouched
    out.backward()
    grad = w.grad.item()
    return value if grad == torch.tensor(value).item() else grad


def test_only_non_finite_losses_poison_the_gradient_without_the_spike_guard():
    g = StepGuard(torch.device("cpu"))
    assert _grad(g, 3.0) == 3.0 and _grad(g, 1e30) == 1e30
    assert math.isnan(_grad(g, float("inf"))) and math.isnan(_grad(g, float("nan")))


def test_spike_guard_acts_once_its_window_is_full_and_resumes_with_it():
    g = StepGuard(torch.device("cpu"), spike_sigma=3.0, spike_window=8)
    assert _grad(g, 9.0) == 9.0  # the window is not full: no verdict yet
    for v in [5.0, 5.1, 4.9, 5.05, 4.95, 5.0, 5.1, 4.9]:  # fills it (the 9.0 rotates out)
        assert _grad(g, v) == v
    assert math.isnan(_grad(g, 6.0))  # mean 5, std ~0.08: beyond mean + 3σ
    assert _grad(g, 5.05) == 5.05
    h = StepGuard(torch.device("cpu"), spike_sigma=3.0, spike_window=8)
    h.load_state_dict(g.state_dict())  # a resumed run: the same window, so the same verdicts
    for v in [5.0, 7.0, 5.2, 30.0, 4.8]:
        assert str(_grad(h, v)) == str(_grad(g, v)), v


def test_counts_and_stops_after_k_consecutive_skips():
    g = StepGuard(torch.device("cpu"), max_consecutive=3)
    norms = [torch.tensor(1.0), torch.tensor(float("nan")), float("inf"), torch.tensor(2.0),  # DeepSpeed's inf
             torch.tensor(float("nan")), torch.tensor(float("inf"))]
    for n in norms:
        g.after_step(n)
    assert g.check(6) == 4  # skipped 2, 3, 5, 6; the longest run is 2
    g.after_step(torch.tensor(float("nan")))
    with pytest.raises(TooManySkips, match="3 optimizer steps in a row were skipped .* by step 7"):
        g.check(7)
    unlimited = StepGuard(torch.device("cpu"), max_consecutive=0)
    for _ in range(10):
        unlimited.after_step(float("nan"))
    assert unlimited.check(10) == 10
