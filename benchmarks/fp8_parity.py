"""FP8 against bf16 training loss: the 350m flavour for 500 steps on a real corpus, one GPU (issue 25's
loss-parity bar: final validation loss within 1%, no divergence, both curves plotted).

    python benchmarks/fp8_parity.py --data data/stdlib_text_document --json $OUT/fp8_parity.json \
        --plot $OUT/fp8_parity.png             # ~4 minutes on one H200 (estimate: see below)
    python benchmarks/fp8_parity.py --plot fp8_parity.png --from-json fp8_parity.json   # redraw on any machine

Both runs: examples/configs/350m.yaml, seq 2048, micro-batch 8 (16,384 tokens a step, 8.2M over 500
steps), ZeRO-0 master_fused, compiled, the same seed (same init, same data order), warm-up 50
steps then cosine to min_lr, validation every 50 steps over 20 micro-batches. The second run adds
--train.fp8 RECIPE (default tensorwise). The vocabulary is the tokenizer's (--vocab; the demo
corpus's is 4096, the 350m flavour's 32000). Estimate: 350m at 16K tokens a step is ~43 TFLOP, ~90
ms at 50% MFU: 45 s for 500 steps, plus ~10 s of validation, ~20 s of compile and ~15 s of start
a run, so ~3 minutes for the two; the FP8 run a little less.

Verdict: every training loss finite, and the final validation losses within 1% of each other;
"no divergence" also asks that FP8's validation loss never exceeds bf16's by more than 2% at any
evaluation after the first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(data: str, vocab: int, steps: int, fp8: str, run_dir: str, timeout: int) -> dict:
    flags = ["--config", "examples/configs/350m.yaml", "--data.paths", data, "--model.vocab_size", str(vocab),
             "--train.steps", str(steps), "--optim.warmup_steps", "50", "--train.eval_interval", "50",
             "--train.eval_steps", "20", "--train.log_interval", "10", "--optim.zero_stage", "0",
             "--train.compile", "true", "--train.fp8", fp8, "--checkpoint.save_at_end", "false",
             "--checkpoint.resume", "false", "--logging.tensorboard", "false", "--train.progress", "off",
             "--train.run_dir", run_dir]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "megamod.train", *flags], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"the {fp8} run failed:\n{(p.stderr or p.stdout)[-3000:]}")
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {"train": {r["step"]: r["loss"] for r in recs if r["kind"] == "train"},
            "valid": {r["step"]: r["val_loss"] for r in recs if r["kind"] == "valid"},
            "step_time_s": [r["step_time_s"] for r in recs if r["kind"] == "train"][-1]}


def verdict(bf16: dict, fp8: dict) -> dict:
    finite = all(math.isfinite(v) for v in (*fp8["train"].values(), *fp8["valid"].values()))
    last = max(bf16["valid"])
    final_rel = abs(fp8["valid"][last] - bf16["valid"][last]) / bf16["valid"][last]
    steps = sorted(s for s in bf16["valid"] if s in fp8["valid"] and s > min(bf16["valid"]))
    worst = max((fp8["valid"][s] / bf16["valid"][s] - 1 for s in steps), default=0.0)
    return {"finite": finite, "final_step": last, "final_rel_diff": final_rel, "worst_excess": worst,
            "pass": finite and final_rel <= 0.01 and worst <= 0.02}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["runs"].items():
        for ax, kind in ((a, "train"), (b, "valid")):
            steps = sorted(r[kind], key=int)  # JSON keys: strings
            ax.plot([int(s) for s in steps], [r[kind][s] for s in steps], label=name)
    for ax, title in ((a, "training loss"), (b, "validation loss")):
        ax.set_xlabel("step")
        ax.set_title(f"350m, {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/stdlib_text_document", help="dataset prefix (.bin/.idx)")
    ap.add_argument("--vocab", type=int, default=4096, help="the tokenizer's vocabulary size")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    ap.add_argument("--timeout", type=int, default=600, help="seconds a run may take")
    ap.add_argument("--json", help="write the curves and the verdict here")
    ap.add_argument("--plot", help="draw both curves into this PNG (needs matplotlib)")
    ap.add_argument("--from-json", help="only draw, from an earlier --json")
    a = ap.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            plot(json.load(f), a.plot)
        return 0
    runs = {}
    for fp8 in ("off", a.recipe):
        with tempfile.TemporaryDirectory() as run_dir:
            runs["bf16" if fp8 == "off" else f"fp8 {fp8}"] = run(a.data, a.vocab, a.steps, fp8, run_dir, a.timeout)
    (b, bf16), (f, fp8) = runs.items()
    out = {"runs": runs, "verdict": verdict(bf16, fp8)}
    for name, r in runs.items():
        print(f"{name}: final val loss {r['valid'][max(r['valid'])]:.4f}, step {r['step_time_s'] * 1e3:.1f} ms; "
              f"val " + " ".join(f"{s}:{v:.3f}" for s, v in sorted(r["valid"].items())))
    print(json.dumps(out["verdict"]))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    if a.plot:
        try:
            plot(json.loads(json.dumps(out)), a.plot)
        except ImportError:
            print("matplotlib is not installed here: redraw later with --from-json", file=sys.stderr)
    return 0 if out["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
