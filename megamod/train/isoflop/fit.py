"""Fits of an isoFLOP sweep, with scipy and numpy (no hand-written optimiser).

- Per budget: loss = c0 + c1·x + c2·x², x = ln N, fitted with a Huber loss
  (scipy.optimize.least_squares, least-squares start); its minimum N_opt = exp(-c1 / 2c2) is the
  isoFLOP-optimal model. Interval: a bootstrap of the fit (refits on fitted values plus
  resampled residuals, inflated by sqrt(n / (n - 3)) for the three fitted parameters; or, where
  the sweep repeated runs with other seeds, Gaussian noise of the measured seed-to-seed standard
  deviation), the 2.5-97.5 percentiles of the refits' minima. ``edge`` flags a minimum that is
  no minimum (c2 <= 0), lies outside the sizes, or whose lowest measured loss is the smallest or
  largest size: the grid does not bracket the optimum.
- Across budgets: N_opt = k·C^a (least squares in log-log), the interval of ``a`` from refits on one
  bootstrap minimum per budget.
- Loss against compute: loss = a·C^-b (least squares in log-log; C in PFLOP/s-days as in the MoBA
  report), the interval of b from a residual bootstrap.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from scipy.optimize import least_squares

PFLOPS_DAY = 1e15 * 86400
N_BOOT = 1000


def _parabola(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(c0, c1, c2), Huber-robust (f_scale: 1.345 robust standard deviations of the LSQ residuals)."""
    start = np.polyfit(x, y, 2)[::-1]
    resid = y - np.polyval(start[::-1], x)
    scale = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    if scale <= 1e-12 or len(x) <= 3:
        return start  # an exact fit: nothing for a robust loss to down-weight
    fit = least_squares(lambda c: c[0] + c[1] * x + c[2] * x**2 - y, start, loss="huber", f_scale=1.345 * scale)
    return fit.x


def isoflop_minimum(sizes, losses, sigma: float | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The isoFLOP-optimal size of one budget's runs (module docstring)."""
    x, y = np.log(np.asarray(sizes, float)), np.asarray(losses, float)
    out: dict[str, Any] = {"n_points": int(len(x)), "edge": False, "reason": "", "n_opt": math.nan,
                           "n_opt_lo": math.nan, "n_opt_hi": math.nan, "loss_opt": math.nan, "samples": []}
    if len(np.unique(x)) < 3:
        out.update(edge=True, reason=f"{len(np.unique(x))} sizes: a parabola needs 3")
        return out
    c = _parabola(x, y)
    reasons = []
    xm = -c[1] / (2 * c[2]) if c[2] > 0 else math.inf
    if abs(xm - x.mean()) > 20:  # c2 <= 0, or so flat that the "minimum" is e^20 times off the grid
        out.update(edge=True, reason="no minimum: the losses do not curve up")
        return out
    out.update(n_opt=float(math.exp(xm)), loss_opt=float(c[0] + c[1] * xm + c[2] * xm**2), coef=[float(v) for v in c])
    if not x.min() <= xm <= x.max():
        reasons.append("the fitted minimum lies outside the sizes")
    if int(np.argmin(y)) in (int(np.argmin(x)), int(np.argmax(x))):
        reasons.append("the lowest loss is at the grid's edge")
    fitted = c[0] + c[1] * x + c[2] * x**2
    resid = (y - fitted) * math.sqrt(len(x) / (len(x) - 3)) if len(x) > 3 else np.zeros_like(y)
    rng = np.random.default_rng(seed)
    samples = []
    if sigma or resid.any():
        for _ in range(n_boot):
            noise = rng.normal(0, sigma, len(y)) if sigma else rng.choice(resid, len(y))
            cb = _parabola(x, fitted + noise)
            if cb[2] > 0:
                samples.append(-cb[1] / (2 * cb[2]))
    if samples:
        lo, hi = np.percentile(samples, [2.5, 97.5])
        out.update(n_opt_lo=float(math.exp(lo)), n_opt_hi=float(math.exp(hi)), samples=samples)
    else:
        out["note"] = "no interval: 3 points fit exactly and no seed noise was measured"
    out.update(edge=bool(reasons), reason="; ".join(reasons))
    return out


def optimal_size_exponent(budgets, minima: list[dict[str, Any]], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """N_opt = k·C^a over budgets; the interval of a from bootstrap minima (one per budget)."""
    keep = [(c, m) for c, m in zip(budgets, minima) if math.isfinite(m["n_opt"])]
    if len(keep) < 2:
        return {"a": math.nan, "a_lo": math.nan, "a_hi": math.nan, "n_budgets": len(keep),
                "reason": "needs minima at 2 budgets or more"}
    lc = np.log([c for c, _ in keep])
    a, logk = np.polyfit(lc, np.log([m["n_opt"] for _, m in keep]), 1)
    out = {"a": float(a), "k": float(math.exp(logk)), "n_budgets": len(keep), "a_lo": math.nan, "a_hi": math.nan,
           "reason": ""}
    if all(m["samples"] for _, m in keep):
        rng = np.random.default_rng(seed)
        slopes = [np.polyfit(lc, [rng.choice(m["samples"]) for _, m in keep], 1)[0] for _ in range(n_boot)]
        out["a_lo"], out["a_hi"] = (float(v) for v in np.percentile(slopes, [2.5, 97.5]))
    else:
        out["reason"] = "no interval: a budget's minimum has none"
    return out


def loss_power_law(compute, losses, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """loss = a·C^-b with C in PFLOP/s-days."""
    lc, ll = np.log(np.asarray(compute, float) / PFLOPS_DAY), np.log(np.asarray(losses, float))
    if len(np.unique(lc)) < 2:
        return {"a": math.nan, "b": math.nan, "b_lo": math.nan, "b_hi": math.nan, "n_points": int(len(lc)),
                "reason": "needs 2 compute values or more"}
    slope, icpt = np.polyfit(lc, ll, 1)
    out = {"a": float(math.exp(icpt)), "b": float(-slope), "n_points": int(len(lc)), "b_lo": math.nan,
           "b_hi": math.nan, "reason": ""}
    resid = ll - (icpt + slope * lc)
    if len(lc) > 2 and resid.any():
        rng = np.random.default_rng(seed)
        fitted, inflate = icpt + slope * lc, math.sqrt(len(lc) / (len(lc) - 2))
        bs = [-np.polyfit(lc, fitted + inflate * rng.choice(resid, len(lc)), 1)[0] for _ in range(n_boot)]
        out["b_lo"], out["b_hi"] = (float(v) for v in np.percentile(bs, [2.5, 97.5]))
    else:
        out["reason"] = "no interval: 2 points fit exactly"
    return out


def seed_noise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled standard deviation of the loss over runs that differ only in their seed."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["budget_flops"], r.get("d_model"), r.get("n_layers"), r.get("seq_len"))].append(r["loss"])
    repeated = [v for v in groups.values() if len(v) > 1]
    dof = sum(len(v) - 1 for v in repeated)
    if not dof:
        return {"sigma": None, "configs": 0}
    ss = sum(float(np.sum((np.asarray(v) - np.mean(v)) ** 2)) for v in repeated)
    return {"sigma": math.sqrt(ss / dof), "configs": len(repeated),
            "spreads": [float(max(v) - min(v)) for v in repeated]}
