"""The MoD and MoBA papers' charts, drawn with matplotlib from a results table and its fits.

Every chart is written as ``NAME.png`` with the data behind it as ``NAME.csv``:
- ``isoflop_curves``: loss vs parameters, one curve per (variant, budget), the fitted parabola
  and its minimum (MoD paper, Figure 3);
- ``normalised``: loss / the isoFLOP-optimal baseline's loss vs FLOPs per forward pass / the
  optimal baseline's, per budget (MoD, Figure 4 left); where a budget's fit has no minimum, its
  lowest-loss baseline run stands in for the optimum;
- ``loss_vs_flops`` and ``loss_vs_wallclock``: training loss curves of the optimal baseline, a
  larger baseline, and the routed runs of the same two sizes (MoD, Figure 4 right);
- ``flops_steps_bars``: FLOPs per step and steps per second of those four;
- ``scaling`` and ``scaling_trailing``: loss (and the trailing-token loss) vs PFLOP/s-days with
  the fitted a·C^-b per variant (MoBA, Figures 3 and 4).
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import numpy as np

from megamod.train.isoflop.fit import PFLOPS_DAY
from megamod.train.isoflop.results import budget_tag


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; chosen here, not at import time
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str, name: str, header: list[str], rows: list[list[Any]]) -> str:
    path = os.path.join(out_dir, name + ".png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    with open(os.path.join(out_dir, name + ".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def isoflop_curves(rows, fits, size_key: str, out_dir: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted({r["budget_flops"] for r in rows})
    colours = dict(zip(budgets, plt.cm.viridis(np.linspace(0, 0.85, max(1, len(budgets))))))
    markers = dict(zip(sorted({r["variant"] for r in rows}), "osD^v<>p"))
    data = []
    for (variant, budget), group in sorted(_by(rows, "variant", "budget_flops").items()):
        group = sorted(group, key=lambda r: r[size_key])
        n, loss = [r[size_key] for r in group], [r["loss"] for r in group]
        ax.plot(n, loss, markers[variant], color=colours[budget], label=f"{variant} {budget_tag(budget)}")
        data += [[variant, budget, r["name"], r[size_key], r["loss"], "run"] for r in group]
        fit = fits["variants"].get(variant, {}).get("budgets", {}).get(budget_tag(budget), {})
        if fit.get("coef"):
            xs = np.linspace(math.log(min(n)), math.log(max(n)), 50)
            c = fit["coef"]
            ax.plot(np.exp(xs), c[0] + c[1] * xs + c[2] * xs**2, "--" if variant != "dense" else "-",
                    color=colours[budget], lw=1)
            if math.isfinite(fit["n_opt"]):
                ax.plot([fit["n_opt"]], [fit["loss_opt"]], "*", color=colours[budget], ms=12, mec="k")
                data.append([variant, budget, "fit minimum", fit["n_opt"], fit["loss_opt"], "edge" if fit["edge"] else "fit"])
    ax.set(xscale="log", xlabel=f"{size_key.replace('_', ' ')}", ylabel="validation loss", title="isoFLOP curves")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir, "isoflop_curves", ["variant", "budget_flops", "name", size_key, "loss", "kind"], data)


def normalised(rows, fits, size_key: str, baseline: str, out_dir: str) -> str | None:
    """Each run against the isoFLOP-optimal baseline of its budget: loss / its fitted loss, FLOPs
    per forward pass / those of a baseline of the optimal size (interpolated in log-log). None
    when no budget has two baseline runs."""
    data = []
    for budget, group in sorted(_by(rows, "budget_flops").items()):
        fit = fits["variants"].get(baseline, {}).get("budgets", {}).get(budget_tag(budget[0]), {})
        base = sorted((r for r in group if r["variant"] == baseline), key=lambda r: r[size_key])
        if len(base) < 2:
            continue
        if fit and math.isfinite(fit["n_opt"]):
            n_opt, loss_opt = fit["n_opt"], fit["loss_opt"]
        else:  # the fit found no minimum: the best baseline run stands in for it
            best = min(base, key=lambda r: r["loss"])
            n_opt, loss_opt = best[size_key], best["loss"]
        f_opt = math.exp(np.interp(math.log(n_opt), [math.log(r[size_key]) for r in base],
                                   [math.log(r["forward_flops_per_seq"]) for r in base]))
        data += [[r["variant"], budget[0], r["name"], r["forward_flops_per_seq"] / f_opt, r["loss"] / loss_opt]
                 for r in group]
    if not data:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for variant in sorted({d[0] for d in data}):
        pts = [d for d in data if d[0] == variant]
        ax.plot([d[3] for d in pts], [d[4] for d in pts], "o" if variant == baseline else "s", label=variant, alpha=0.8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="FLOPs per forward pass / optimal baseline's",
           ylabel="loss / optimal baseline's", title="normalised loss vs normalised FLOPs per forward pass")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "normalised", ["variant", "budget_flops", "name", "norm_flops_per_fwd", "norm_loss"], data)


def four_models(rows, fits, size_key: str, baseline: str, routed: str, budget: float | None) -> list[dict] | None:
    """The optimal baseline, the next larger baseline and the routed runs of the same two shapes,
    at ``budget`` (default: the budget with the most baseline runs, the larger one on a tie)."""
    base_rows = [r for r in rows if r["variant"] == baseline]
    if not base_rows:
        return None
    if budget is None:
        counts = {b: len(g) for (b,), g in _by(base_rows, "budget_flops").items()}
        budget = max(counts, key=lambda b: (counts[b], b))
    base = sorted((r for r in base_rows if r["budget_flops"] == budget), key=lambda r: r[size_key])
    fit = fits["variants"].get(baseline, {}).get("budgets", {}).get(budget_tag(budget), {})
    target = fit["n_opt"] if fit and math.isfinite(fit.get("n_opt", math.nan)) else min(base, key=lambda r: r["loss"])[size_key]
    i = min(range(len(base)), key=lambda j: abs(math.log(base[j][size_key] / target)))
    chosen = [(f"{baseline} (optimal)", base[i])] + ([(f"{baseline} (larger)", base[i + 1])] if i + 1 < len(base) else [])
    pool = [r for r in rows if r["variant"] == routed and r["budget_flops"] == budget]
    for label, b in list(chosen):
        same = [r for r in pool if (r["d_model"], r["n_layers"]) == (b["d_model"], b["n_layers"])]
        near = same or sorted(pool, key=lambda r: abs(math.log(r[size_key] / b[size_key])))[:1]
        if near:
            chosen.append((f"{routed} ({label.split('(')[1][:-1]} shape)", near[0]))
    return [dict(r, label=label) for label, r in chosen]


def loss_curves(models, curves, out_dir: str) -> list[str]:
    plt = _pyplot()
    paths = []
    by_name = _by(curves, "name")
    for key, name, xlabel, scale in (("flops", "loss_vs_flops", "FLOPs", 1.0),
                                     ("train_s", "loss_vs_wallclock", "training time (s)", 1.0)):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        data = []
        for m in models:
            pts = sorted(by_name.get((m["name"],), []), key=lambda c: c["step"])
            if not pts:
                continue
            xs, ys = [p[key] * scale for p in pts], [p["loss"] for p in pts]
            ax.plot(xs, _smooth(ys), label=f"{m['label']} ({m['name']})")
            data += [[m["label"], m["name"], p["step"], p[key], p["loss"]] for p in pts]
        ax.set(xlabel=xlabel, ylabel="training loss (smoothed)", title=f"loss vs {xlabel}",
               xscale="log" if key == "flops" else "linear")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir, name, ["label", "name", "step", key, "loss"], data))
    return paths


def _smooth(ys: list[float], window: int = 5) -> list[float]:
    """Trailing mean over ``window`` logged points (a logged loss is one batch's)."""
    return [float(np.mean(ys[max(0, i - window + 1): i + 1])) for i in range(len(ys))]


def bars(models, out_dir: str) -> str:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    labels = [m["label"].replace(" (", "\n(") for m in models]
    a.bar(labels, [m["flops_per_step"] for m in models], color="tab:blue")
    a.set(ylabel="FLOPs per step", title="FLOPs per step")
    b.bar(labels, [m["steps_per_s"] for m in models], color="tab:orange")
    b.set(ylabel="steps per second", title="steps per second")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    return _save(fig, out_dir, "flops_steps_bars", ["label", "name", "flops_per_step", "steps_per_s"],
                 [[m["label"], m["name"], m["flops_per_step"], m["steps_per_s"]] for m in models])


def scaling(points: dict[str, list[tuple[float, float, str]]], fits: dict[str, dict], metric: str, out_dir: str,
            name: str) -> str:
    """points[variant] = [(compute FLOPs, loss, run name)]; fits[variant] = loss_power_law's."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    data = []
    for variant, pts in sorted(points.items()):
        pts = sorted(pts)
        x = [c / PFLOPS_DAY for c, _, _ in pts]
        line, = ax.plot(x, [loss for _, loss, _ in pts], "o", label=variant)
        f = fits.get(variant, {})
        if math.isfinite(f.get("b", math.nan)):
            xs = np.geomspace(min(x), max(x), 50)
            ax.plot(xs, f["a"] * xs ** (-f["b"]), "--", color=line.get_color(),
                    label=f"{variant}: {f['a']:.3f}·C^{-f['b']:.3f}")
        data += [[variant, n, c, c / PFLOPS_DAY, loss] for c, loss, n in pts]
    ax.set(xscale="log", yscale="log", xlabel="PFLOP/s-days", ylabel=metric.replace("_", " "),
           title=f"{metric.replace('_', ' ')} vs compute")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name, ["variant", "name", "flops", "pflops_days", metric], data)


def _by(rows, *keys):
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out
