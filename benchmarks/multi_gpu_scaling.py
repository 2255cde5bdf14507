"""benchmarks/multi_gpu.py's throughput sections: weak scaling of data, tensor and pipeline
parallelism against one GPU, and tensor parallelism's collectives under torch.profiler (method:
multi_gpu.py's docstring). A mixin of multi_gpu.Bench."""

from __future__ import annotations

import json
import statistics

from megamod.config import load_config
from multi_gpu_grids import TINY, Grid, profile_grids, scaling_grids


class Scaling:
    def throughput_row(self, flavour: str, g: Grid, run: dict, profiled: range = range(0)) -> dict:
        """Medians over the steps after the first steps/4, leaving out the ``profiled`` ones."""
        S, warm = self.a.steps, max(1, self.a.steps // 4)
        micro, accum = self.batch("scaling", flavour, g)
        kept = lambda d: [v for s, v in sorted(d.items()) if s > warm and s not in profiled]  # noqa: E731
        tps, mfu = kept(run["tokens_per_s"]), kept(run["mfu"])
        zero = g.zero or load_config(self.config(flavour), []).optim.zero_stage
        row = {"flavour": flavour, "grid": g.name, "zero": zero,
               "ranks": g.world, "batch": f"{micro}×{accum}", "seqs_per_gpu_step": micro * accum * g.dp / g.world,
               "ok": run["rc"] == 0 and len(run["tokens_per_s"]) == S, "wall_s": run["wall_s"]}
        if row["ok"]:
            row.update(tokens_per_s_per_gpu=statistics.median(tps) / g.world,
                       mfu=statistics.median(mfu) if mfu else None, peak_gib=run["peak_gib"],
                       step_ms=1e3 * statistics.median(kept(run["step_time_s"])) if run.get("step_time_s") else None)
            base = [row] if g.name == "dp1-z1" else [  # the 1-GPU ZeRO-1 run: this call's, else --reference's
                x for x in self.res["scaling"] + (self.ref or {}).get("scaling", [])
                if x["flavour"] == flavour and x["grid"] == "dp1-z1" and x["ok"]]
            if base:
                row["efficiency"] = row["tokens_per_s_per_gpu"] / base[0]["tokens_per_s_per_gpu"]
        return row

    def scaling(self, flavour: str) -> None:
        for g in scaling_grids(self.a.gpus):
            if not self.wanted(g, always=g.world == 1):
                continue
            flags = self.flags("scaling", flavour, g)
            if not self.runnable("scaling", flavour, g, flags):
                continue
            row = self.throughput_row(flavour, g, self.launch(f"scaling/{flavour}/{g.name}", flags, g.world))
            print(f"[scaling] {flavour} {g.name}: " + json.dumps({k: v for k, v in row.items() if k != "flavour"}),
                  flush=True)
            self.res["scaling"].append(row)
            self.write()

    def tp_profile(self, flavour: str) -> None:
        """The tp grids again, profiled over --tp-profile-steps (the other steps give the step time)."""
        a, b = map(int, self.a.tp_profile_steps.split(":"))
        layers = load_config(self.config(flavour), TINY if self.a.tiny else []).model.n_layers
        for g in profile_grids(self.a.gpus):
            flags = self.flags("scaling", flavour, g)
            if not self.wanted(g) or not self.runnable("tp-profile", flavour, g, flags):
                continue
            run = self.launch(f"tp_profile/{flavour}/{g.name}", flags, g.world, probe=["--profile-steps", f"{a}:{b}"])
            row = self.throughput_row(flavour, g, run, profiled=range(a, b + 1))
            prof = run.get("profile") or []  # one summary per rank (train_probe.py)
            if prof:
                mean = lambda key: statistics.mean(p[key] for p in prof)  # noqa: E731
                row.update({k: mean(k) for k in ("nccl_ms", "exposed_ms", "compute_ms", "nccl_kernels", "wall_ms")})
                kinds = sorted({k for p in prof for k in p["by_kind_ms"]})
                row["by_kind_ms"] = {k: statistics.mean(p["by_kind_ms"].get(k, 0.0) for p in prof) for k in kinds}
                row.update(per_layer_ms=row["nccl_ms"] / layers,
                           kernels_per_layer=row["nccl_kernels"] / layers / self.batch("scaling", flavour, g)[1])
            else:
                row["note"] = "no profile came back"
            print(f"[tp-profile] {flavour} {g.name}: " + json.dumps({k: v for k, v in row.items() if k != "flavour"}),
                  flush=True)
            self.res["tp_profile"].append(row)
            self.write()

