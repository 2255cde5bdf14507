"""benchmarks/multi_gpu.py's correctness section: every grid against the 1-GPU reference, with
tolerances from a control run, and a checkpoint resumed on another grid (method: multi_gpu.py's
docstring). A mixin of multi_gpu.Bench, whose launch/flags/record bookkeeping it uses."""

from __future__ import annotations

import shutil

from multi_gpu_grids import ACCUM, FLOORS, MICRO, Grid, correctness_grids
from multi_gpu_report import compare


class Correctness:
    def correctness(self, flavour: str, variant: str) -> None:
        S, one, vf = self.a.steps, Grid(), self.variant_flags(flavour, variant)
        label, k = flavour if variant == "dense" else f"{flavour}+{variant}", S // 2
        ref = self.launch(f"correctness/{label}/1gpu", self.flags("correctness", flavour, one, vf), 1)
        ctl = self.launch(f"correctness/{label}/1gpu-mb8",
                          self.flags("correctness", flavour, one, vf, micro_accum=(MICRO * ACCUM, 1)), 1)
        if ref["rc"] != 0 or ctl["rc"] != 0 or len(ref["loss"]) < S or len(ctl["loss"]) < S:
            self.failed = True
            self.res["correctness"].append({"flavour": label, "grid": "1gpu", "pass": False,
                                            "note": "the reference or control run failed"})
            return self.write()
        c = compare(ref, ctl, range(1, S + 1))
        f1, fm = FLOORS[self.dtype]
        tol = {"step1": max(f1, 3 * c["step1_loss"], 3 * c["step1_grad_norm"]), "mean": max(fm, 3 * c["mean"]),
               "max": max(3 * fm, 3 * c["max"])}
        self.res["tolerance"][label] = tol
        self.res["correctness"].append({"flavour": label, "grid": "1gpu-mb8 (control)", "ranks": 1,
                                        "batch": f"{MICRO * ACCUM}×1", **c, "pass": None})
        resume = self.a.resume if variant == "dense" else self.a.resume_moba
        save_name, _, at_name = resume.partition(":")
        for g in correctness_grids(self.a.gpus, variant):
            is_save = g.name == save_name  # its run also checkpoints at step k for the resume check
            if not self.wanted(g, always=is_save):
                continue
            flags = self.flags("correctness", flavour, g,
                               vf + self.perturb + (["--checkpoint.interval", str(k)] * is_save))
            if not self.runnable("correctness", label, g, flags):
                continue
            run = self.launch(f"correctness/{label}/{g.name}", flags, g.world)
            self.record("correctness", label, g, ref, run, range(1, S + 1), tol)
        if resume != "none":
            self.resume(flavour, label, vf, Grid.parse(save_name), Grid.parse(at_name), ref, tol, k)
        self.write()

    def resume(self, flavour: str, label: str, vf: list[str], save: Grid, at: Grid, ref: dict, tol: dict,
               k: int) -> None:
        src = self.work / f"correctness/{label}/{save.name}/checkpoints/step_{k:08d}"
        flags = self.flags("correctness", flavour, at, vf + self.perturb)
        missing = None if (src / "megamod_complete.json").exists() else f"no checkpoint {src} (did {save.name} run?)"
        if not self.runnable("resume", label, at, flags, reason=missing):
            return
        key = f"resume/{label}/{save.name}_to_{at.name}"
        shutil.rmtree(self.work / key, ignore_errors=True)
        shutil.copytree(src, self.work / key / "checkpoints" / src.name)  # a run dir holding step k alone
        run = self.launch(key, flags, at.world, run_dir=self.work / key)
        row = self.record("resume", label, at, ref, run, range(k + 1, self.a.steps + 1), tol,
                          saved_at=save.name, step=k)
        if not run["resumed"]:
            row.update({"pass": False, "note": "the run did not resume from the checkpoint"})
            self.failed = True

    def record(self, section: str, flavour: str, g: Grid, ref: dict, run: dict, steps: range, tol: dict,
               **extra) -> dict:
        micro, accum = self.batch("correctness", flavour, g)
        row = {"flavour": flavour, "grid": g.name, "ranks": g.world, "batch": f"{micro}×{accum}",
               "wall_s": run["wall_s"], **extra}
        if run["rc"] != 0 or any(s not in run["loss"] for s in steps):
            row.update({"pass": False, "note": f"run failed (exit {run['rc']}), see {run['log']}"})
        else:
            c = compare(ref, run, steps)
            ok = c["mean"] <= tol["mean"] and c["max"] <= tol["max"]
            if steps.start == 1:  # step-1 checks only for runs that start from the init
                ok = ok and c["step1_loss"] <= tol["step1"] and c["step1_grad_norm"] <= tol["step1"]
            row.update(c, **{"pass": ok})
        self.failed |= not row["pass"]
        print(f"[{'pass' if row['pass'] else 'FAIL'}] {section} {flavour} {g.name}: "
              + " ".join(f"{k} {v:.2e}" for k, v in row.items() if isinstance(v, float) and k != "wall_s"), flush=True)
        self.res[section].append(row)
        self.write()
        return row

