"""isoFLOP and scaling-law sweeps of megamod runs: plan, run (resumable), analyse.

    python tools/isoflop.py plan SPEC.yaml --out sweep.json      # budgets x sizes x variants -> manifest
    python tools/isoflop.py show sweep.json                       # runs, pieces, estimated GPU time
    python tools/isoflop.py run sweep.json [--piece 1] [--time-limit 540] [--table T.csv]
    python tools/isoflop.py analyse --table T.csv --out DIR       # or --runs SWEEP_DIR...
    bash slurm/isoflop_submit.sh sweep.json                       # the same runs as a Slurm job array

The rules (width/depth, steps from the analytic FLOPs, pieces) are in megamod/train/isoflop/plan.py,
the fits in fit.py, the charts in plots.py; README "isoFLOP sweeps" shows an example.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def cmd_plan(a) -> int:
    from megamod.config import ConfigError
    from megamod.train.isoflop.plan import PlanError, add_seed_repeats, assign_pieces, load_spec, plan
    from megamod.train.isoflop.results import read_table
    from megamod.train.isoflop.runner import load_manifest

    try:
        if a.repeat_minima:
            manifest = load_manifest(a.spec)
            added = add_seed_repeats(manifest, read_table(a.repeat_minima), a.seed)
            print(f"added {len(added)} runs with seed {a.seed} at the minima of {a.repeat_minima}")
        else:
            spec = load_spec(a.spec)
            if a.assume_tflops:
                spec.assume_tflops = a.assume_tflops
            manifest = plan(spec)
    except (PlanError, ConfigError, ValueError) as e:
        print(f"isoflop plan: error: {e}", file=sys.stderr)
        return 2
    if a.assume_tflops and a.repeat_minima:
        manifest["assume_tflops"] = a.assume_tflops
        assign_pieces(manifest)
    out = a.out or (a.spec if a.repeat_minima else os.path.splitext(a.spec)[0] + ".json")
    with open(out, "w") as f:
        json.dump(manifest, f, indent=1)
    print(summary(manifest))
    print(f"wrote {out}")
    return 0


def summary(manifest: dict) -> str:
    lines = [f"{'piece':>5} {'run':<34} {'steps':>6} {'FLOPs':>9} {'|err|':>6} {'6ND':>9} {'params':>10} {'est s':>6}"]
    pieces: dict[int, list[float]] = {}
    for r in manifest["runs"]:
        lines.append(f"{r['piece']:>5} {r['name']:<34} {r['steps']:>6} {r['flops']:>9.3g} "
                     f"{100 * r['budget_error']:>5.2f}% {r['flops_6n']:>9.3g} {r['params']:>10,d} {r['est_gpu_s']:>6.0f}")
        p = pieces.setdefault(r["piece"], [0, 0.0, 0.0])
        p[0] += 1
        p[1] += r["flops"]
        p[2] += r["est_gpu_s"]
    lines.append(f"estimated GPU time assumes {manifest['assume_tflops']:g} TFLOP/s and {manifest['overhead_s']:g} s "
                 f"of start-up and evaluation per run:")
    lines += [f"  piece {k}: {n} runs, {f:.3g} FLOPs, ~{s / 60:.1f} min" for k, (n, f, s) in sorted(pieces.items())]
    total = sum(s for _, _, s in pieces.values())
    lines.append(f"  all: {len(manifest['runs'])} runs, ~{total / 60:.1f} min")
    for r in manifest["infeasible"]:
        lines.append(f"  cannot run {r['name']}: {r['reason']}")
    return "\n".join(lines)


def cmd_show(a) -> int:
    from megamod.train.isoflop.runner import load_manifest

    manifest = load_manifest(a.manifest)
    print(len(manifest["runs"]) if a.count else summary(manifest))
    return 0


def cmd_run(a) -> int:
    from megamod.train.isoflop.runner import run_sweep

    return run_sweep(a.manifest, a.sweep_dir, a.table, a.piece, a.only, a.nproc, a.time_limit, a.dry_run)


def cmd_analyse(a) -> int:
    from megamod.train.isoflop.analyse import analyse, load_inputs
    from megamod.train.isoflop.results import ResultsError

    if bool(a.table) == bool(a.runs):
        print("isoflop analyse: error: give --table CSV or --runs DIR...", file=sys.stderr)
        return 2
    try:
        rows, curves = load_inputs(a.table, a.runs)
    except (ResultsError, ValueError) as e:
        print(f"isoflop analyse: error: {e}", file=sys.stderr)
        return 2
    fits = analyse(rows, curves, a.out, a.size, tuple(a.scaling_variants), a.baseline, a.routed, a.curves_budget)
    for variant, v in fits["variants"].items():
        for budget, m in v["budgets"].items():
            print(f"{variant:>14} {budget:>6}: N_opt {m['n_opt']:.3g} [{m['n_opt_lo']:.3g}, {m['n_opt_hi']:.3g}] "
                  f"loss {m['loss_opt']:.4f}{'  EDGE: ' + m['reason'] if m['edge'] else ''}")
        e = v["exponent"]
        print(f"{variant:>14} N_opt ~ C^{e['a']:.3f} [{e['a_lo']:.3f}, {e['a_hi']:.3f}] {e['reason']}")
    for variant, s in fits["scaling"].items():
        for metric, f in s.items():
            print(f"{variant:>14} {metric}: {f['a']:.3f}·C^{-f['b']:.4f} [b {f['b_lo']:.4f}, {f['b_hi']:.4f}]")
    for w in fits["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {', '.join(fits['charts'])}, fits.json, results.csv to {a.out}"
          + "".join(f"\n  skipped {k}: {v}" for k, v in fits["skipped"].items()))
    return 0


def cmd_task(a) -> int:
    """For slurm/isoflop_array.sbatch: the run's status, directory, config and flags, one a line."""
    from megamod.train.isoflop.runner import task

    print("\n".join(task(a.manifest, a.index, a.sweep_dir)))
    return 0


def cmd_record(a) -> int:
    from megamod.train.isoflop.runner import record_task

    row = record_task(a.manifest, a.index, a.sweep_dir)
    print(f"recorded {row['name']}: loss {row['loss']:.4f}" if row else f"run {a.index} has not finished")
    return 0 if row else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="sweep spec (YAML) -> manifest (JSON)")
    p.add_argument("spec", help="sweep spec (YAML); with --repeat-minima, the manifest to extend")
    p.add_argument("--out", help="manifest to write (default: the spec's name with .json; --repeat-minima: in place)")
    p.add_argument("--assume-tflops", type=float, help="GPU throughput for the time estimates (default: the spec's)")
    p.add_argument("--repeat-minima", metavar="TABLE", help="add the lowest-loss run of each (variant, budget) in "
                   "TABLE again with --seed")
    p.add_argument("--seed", type=int, default=2)
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("show", help="print a manifest's runs, pieces and estimated GPU time")
    p.add_argument("manifest")
    p.add_argument("--count", action="store_true", help="print only the number of runs")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("run", help="train a manifest's unfinished runs, one after another")
    p.add_argument("manifest")
    p.add_argument("--sweep-dir", help="run directories go here (default $MEGAMOD_SWEEP_DIR or runs/isoflop/NAME)")
    p.add_argument("--table", help="results table to update (default SWEEP_DIR/results.csv); its runs count as done")
    p.add_argument("--piece", type=int, nargs="+", help="only these pieces")
    p.add_argument("--only", nargs="+", help="only these runs")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun) ")
    p.add_argument("--time-limit", type=float, help="start no run that would end after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="print the commands")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("analyse", help="fits.json and the charts from a results table or run directories")
    p.add_argument("--table", help="results table (CSV)")
    p.add_argument("--runs", nargs="+", help="run or sweep directories (their TensorBoard events)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="params", choices=["params", "non_embedding_params"])
    p.add_argument("--scaling-variants", nargs="+", default=["moba", "full"], help="variants of the loss-vs-compute charts")
    p.add_argument("--baseline", default="dense")
    p.add_argument("--routed", default="mod", help="the routed variant of the four-model charts")
    p.add_argument("--curves-budget", type=float, help="budget of the four-model charts")
    p.set_defaults(fn=cmd_analyse)
    for name, fn in (("task", cmd_task), ("record", cmd_record)):
        p = sub.add_parser(name, help=f"Slurm array helper ({fn.__doc__ or 'record a finished run'})")
        p.add_argument("manifest")
        p.add_argument("index", type=int)
        p.add_argument("--sweep-dir")
        p.set_defaults(fn=fn)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except ValueError as e:
        print(f"isoflop {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
