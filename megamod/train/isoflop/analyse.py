"""``tools/isoflop.py analyse``: a results table (or run directories) -> fits.json, the charts and
the table itself in one folder.

fits.json:
    size                     the column fitted as "parameters" (params, or non_embedding_params)
    seed_noise               {sigma, configs, spreads}: runs that differ only in their seed
    variants.V.budgets.C     {n_opt, n_opt_lo, n_opt_hi, loss_opt, edge, reason, n_points, coef}
    variants.V.exponent      {a, a_lo, a_hi, k, n_budgets}: N_opt = k·C^a
    scaling.V.loss           {a, b, b_lo, b_hi, n_points}: loss = a·C^-b, C in PFLOP/s-days
    scaling.V.loss_trailing  the same for the trailing-token loss
    charts, skipped          the PNGs written, and those that had no data (with why)
    warnings                 edge-of-grid minima and other things to read before believing a chart
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from megamod.train.isoflop import fit, plots
from megamod.train.isoflop.results import COLUMNS, CURVE_COLUMNS, budget_tag, read_csv, read_table, write_csv


def rows_from_runs(run_dirs: list[str]) -> tuple[list[dict], list[dict]]:
    """Rows and curves of run directories (their TensorBoard events), each with its done marker
    for what the events do not hold (variant, sizes, budget)."""
    from megamod.train.isoflop.results import run_curve, run_row

    rows, curves = [], []
    for d in run_dirs:
        marker = os.path.join(d, "isoflop_done.json")
        if not os.path.exists(marker):
            raise ValueError(f"{d}: no isoflop_done.json (not a finished sweep run; tools/isoflop.py run writes it)")
        with open(marker) as f:
            entry = json.load(f)
        row = run_row(entry, d, entry.get("process_s", math.nan))
        row["data"] = entry.get("data", "")
        rows.append(row)
        curves += run_curve(entry["name"], d)
    return rows, curves


def sweep_run_dirs(paths: list[str]) -> list[str]:
    """Each path is a run directory, or a sweep directory whose subdirectories are runs."""
    out = []
    for p in paths:
        if os.path.exists(os.path.join(p, "isoflop_done.json")):
            out.append(p)
        elif os.path.isdir(p):
            out += sorted(os.path.join(p, d) for d in os.listdir(p)
                          if os.path.exists(os.path.join(p, d, "isoflop_done.json")))
    if not out:
        raise ValueError(f"no finished sweep runs under {' '.join(paths)}")
    return out


def compute_fits(rows, size_key: str, scaling_variants: list[str]) -> dict[str, Any]:
    iso = isoflop_rows(rows)
    noise = fit.seed_noise(iso)
    out: dict[str, Any] = {"size": size_key, "seed_noise": noise, "variants": {}, "scaling": {}, "warnings": []}
    for variant in sorted({r["variant"] for r in iso}):
        budgets, minima, per = [], [], {}
        for budget in sorted({r["budget_flops"] for r in iso if r["variant"] == variant}):
            pts = [r for r in iso if r["variant"] == variant and r["budget_flops"] == budget]
            m = fit.isoflop_minimum([r[size_key] for r in pts], [r["loss"] for r in pts], sigma=noise["sigma"])
            per[budget_tag(budget)] = m
            budgets.append(budget)
            minima.append(m)
            if m["edge"]:
                out["warnings"].append(f"{variant} at {budget_tag(budget)}: {m['reason']}")
        exponent = fit.optimal_size_exponent(budgets, minima)
        for m in minima:
            m.pop("samples")
        out["variants"][variant] = {"budgets": per, "exponent": exponent}
    for variant in scaling_variants:
        pts = frontier([r for r in rows if r["variant"] == variant])
        if pts:
            entry = {"loss": fit.loss_power_law([r["flops"] for r in pts], [r["loss"] for r in pts])}
            trailing = [r for r in pts if _finite(r.get("loss_trailing"))]
            if trailing:
                entry["loss_trailing"] = fit.loss_power_law([r["flops"] for r in trailing],
                                                            [r["loss_trailing"] for r in trailing])
            out["scaling"][variant] = entry
    return out


def isoflop_rows(rows: list[dict]) -> list[dict]:
    """Rows of isoFLOP groups (a table without a kind column is taken as one)."""
    return [r for r in rows if r.get("kind") in ("isoflop", None, "")]


def frontier(rows: list[dict]) -> list[dict]:
    """The lowest-loss run of each budget (a scaling group's runs each have their own budget)."""
    best: dict[float, dict] = {}
    for r in rows:
        if r["budget_flops"] not in best or r["loss"] < best[r["budget_flops"]]["loss"]:
            best[r["budget_flops"]] = r
    return [best[b] for b in sorted(best)]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def analyse(rows: list[dict], curves: list[dict], out_dir: str, size_key: str = "params",
            scaling_variants: tuple[str, ...] = ("moba", "full"), baseline: str = "dense", routed: str = "mod",
            curves_budget: float | None = None) -> dict[str, Any]:
    os.makedirs(out_dir, exist_ok=True)
    data_ids = sorted({str(r.get("data", "")) for r in rows} - {""})
    fits = compute_fits(rows, size_key, list(scaling_variants))
    if len(data_ids) > 1:
        fits["warnings"].append(f"the rows come from {len(data_ids)} different datasets ({', '.join(data_ids)}): "
                                "their losses are not comparable")
    charts, skipped = [], {}
    iso = isoflop_rows(rows)
    if iso:
        charts.append(plots.isoflop_curves(iso, fits, size_key, out_dir))
        path = plots.normalised(iso, fits, size_key, baseline, out_dir)
        (charts.append(path) if path else skipped.update(normalised=f"no {baseline} fit with a minimum"))
        models = plots.four_models(iso, fits, size_key, baseline, routed, curves_budget)
        if models:
            charts += plots.loss_curves(models, curves, out_dir)
            charts.append(plots.bars(models, out_dir))
        else:
            skipped.update(loss_vs_flops=f"no {baseline} runs", loss_vs_wallclock=f"no {baseline} runs",
                           flops_steps_bars=f"no {baseline} runs")
    else:
        skipped.update(isoflop_curves="no isoFLOP rows")
    for metric, name in (("loss", "scaling"), ("loss_trailing", "scaling_trailing")):
        points = {v: [(r["flops"], r[metric], r["name"]) for r in frontier([r for r in rows if r["variant"] == v])
                      if _finite(r.get(metric))] for v in scaling_variants}
        points = {v: p for v, p in points.items() if p}
        if points:
            charts.append(plots.scaling(points, {v: fits["scaling"].get(v, {}).get(metric, {}) for v in points},
                                        metric, out_dir, name))
        else:
            skipped[name] = f"no {metric} of variants {', '.join(scaling_variants)}"
    fits.update(charts=[os.path.basename(c) for c in charts], skipped=skipped)
    write_csv(os.path.join(out_dir, "results.csv"), rows, COLUMNS)
    write_csv(os.path.join(out_dir, "curves.csv"), curves, CURVE_COLUMNS)
    with open(os.path.join(out_dir, "fits.json"), "w") as f:
        json.dump(fits, f, indent=1, default=float)
    return fits


def load_inputs(table: str | None, run_dirs: list[str] | None) -> tuple[list[dict], list[dict]]:
    if table:
        curves_path = os.path.join(os.path.dirname(os.path.abspath(table)), "curves.csv")
        return read_table(table), read_csv(curves_path) if os.path.exists(curves_path) else []
    return rows_from_runs(sweep_run_dirs(run_dirs or []))
