"""benchmarks/multi_gpu.py's long-sequence sections (issue #27): CP MoBA at S = 1M over cp = 8, the
same step with CP's transfers skipped, one GPU at S/cp, MoD under CP, and the longest S that trains.

Runs (the real CLI on synthetic tokens, micro-batch 1, the recipes' activation checkpointing and
chunked loss, ZeRO-1, --long-steps steps; numbers are medians over the steps after the first,
which compiles and autotunes the kernels):
  long    for each --long-variants model: ``hybrid`` is examples/configs/1b_moba_long.yaml as it is
          (MoBA 4096/12, the last 3 layers dense); ``moba`` the same with every layer MoBA (a YAML
          written beside the runs, full_attention_layers []). Each runs on one GPU at S/cp (cp 1,
          the bar's reference: the same per-GPU token count) and on cp GPUs at S; ``hybrid`` also
          with --skip-cp-comm (train_probe.py), whose step-time difference is the CP communication
          that compute does not hide. CP's collectives run on the compute stream and block it (no
          overlap is built), so the profiler would show them nearly all exposed anyway; the skip
          measures what they cost the step, waiting for the slowest rank included.
          Why two models: the bar compares per-GPU tokens/s at S over cp with S/cp on one GPU, which
          isolates CP's cost only when a token costs the same at both lengths. A MoBA token nearly
          does (a query attends ≤ topk blocks at any S), a dense layer's token does not (its
          attention grows with S): by model/flops.py when this was written, a 1M token of the hybrid
          costs 3.0× a 128K one (35.3 vs 11.6 forward GFLOP, the 3 dense layers 74% of the 1M step),
          of the every-layer-MoBA model 1.14× (10.7 vs 9.4). So the hybrid's ratio measures its dense
          layers, the MoBA model's CP. Both are reported, with GFLOP a token and MFU beside them.
  mod     examples/configs/1b_mod_moba_long.yaml at S over cp: routed tokens per rank (logged
          selected_tokens, _max) against capacity · S/cp, step time against the hybrid run.
  search  1b_moba_long.yaml at each of --search-lengths over cp ranks: the dry run's bound per rank
          first (megamod-train --dry-run --world-size cp); a length runs only if the bound is under
          --mem-limit-gib (default 95% of the GPU's memory), and the search stops at the first that
          fails; --search-steps (2: one warm-up, one timed). The length of the long section's run is
          reused, not rerun. Lengths must be multiples of 2·cp·4096 (whole MoBA blocks per chunk).
--tiny: the same sections with the tiny model (MoBA 8/12, MoD window 32) at S = 256 on CPU ranks.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from multi_gpu_report import GIB, cp_bytes_per_layer, gpu_query, selected_tokens

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"hybrid": REPO / "examples/configs/1b_moba_long.yaml",
           "mod": REPO / "examples/configs/1b_mod_moba_long.yaml"}
TINY_LONG = ["--model.n_layers", "4", "--model.d_model", "64", "--model.n_heads", "4", "--model.n_kv_heads", "4",
             "--model.ffn_hidden", "128", "--model.vocab_size", "512", "--moba.chunk_size", "8", "--mod.window", "32"]


class LongContext:
    def __init__(self, bench) -> None:
        from megamod.config import load_config

        self.b, self.a = bench, bench.a
        self.load = load_config
        self.cp = self.a.long_cp
        self.seq = self.a.long_seq
        names = gpu_query("memory.total") if self.a.device == "cuda" else []
        gpu_gib = min(float(m) for m in names) / 1024 if names else 139.0
        self.limit = self.a.mem_limit_gib or round(0.95 * gpu_gib, 1)

    # ---- configs ------------------------------------------------------------------------------
    def config(self, variant: str) -> str:
        if variant != "moba":
            return str(CONFIGS[variant])
        import yaml

        raw = yaml.safe_load(CONFIGS["hybrid"].read_text())
        raw["moba"]["full_attention_layers"] = []  # every layer MoBA (no CLI spelling for an empty list)
        path = Path(self.a.work_dir) / "1b_moba_only_long.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# written by benchmarks/multi_gpu_long.py: 1b_moba_long.yaml, every layer MoBA\n"
                        + yaml.safe_dump(raw, sort_keys=False))
        return str(path)

    def flags(self, variant: str, seq: int, cp: int, steps: int) -> list[str]:
        path = self.config(variant)
        max_len = max(seq, self.load(path, []).model.max_seq_len)
        return ["--config", path, "--data.synthetic", "true", "--train.steps", str(steps),
                "--train.log_interval", "1", "--train.eval_interval", "0", "--train.eval_steps", "1",
                "--train.progress", "off", "--logging.tensorboard", "false", "--checkpoint.interval", "0",
                "--checkpoint.save_at_end", "false", "--train.device", self.a.device, "--parallel.cp", str(cp),
                "--train.seq_len", str(seq), "--model.max_seq_len", str(max_len)] + (TINY_LONG if self.a.tiny else [])

    def dry_run(self, flags: list[str], world: int) -> tuple[float | None, str | None]:
        """(the dry run's GiB per rank, or None; why it cannot run, or None)."""
        from megamod.config import ConfigError, validate
        from megamod.train.dryrun import memory_per_rank

        cfg = self.load(flags[1], flags[2:])
        try:
            validate(cfg, world)
        except ConfigError as e:
            return None, str(e)
        gib = memory_per_rank(cfg, world)["total"] / GIB
        if world > self.a.gpus:
            return gib, f"needs {world} GPUs, --gpus is {self.a.gpus}"
        return gib, None

    def skip(self, section: str, name: str, reason: str) -> None:
        print(f"[skip] {section} {name}: {reason}", flush=True)
        self.b.res["skipped"].append({"section": section, "flavour": "1b", "grid": name, "reason": reason})

    def find(self, key: str) -> dict | None:
        """A run of this call, else of --reference (the 1-GPU references of an earlier call, say)."""
        return self.b.res["runs"].get(key) or (self.b.ref or {}).get("runs", {}).get(key)

    def row(self, variant: str, run_name: str, run: dict, seq: int, ranks: int, profiled: int = 0) -> dict:
        """Medians over the steps after the first (and not step ``profiled``), bytes per layer, balance."""
        steps = sorted(s for s in run["step_time_s"] if s > 1 and s != profiled) or sorted(run["step_time_s"])
        row = {"variant": variant, "run": run_name, "seq": seq, "ranks": ranks,
               "ok": run["rc"] == 0 and len(run["step_time_s"]) > 0, "wall_s": run["wall_s"]}
        if not row["ok"]:
            text = Path(run["log"]).read_text(errors="replace").lower() if Path(run["log"]).exists() else ""
            row["note"] = "**out of memory**" if "out of memory" in text else f"**run failed** (exit {run['rc']})"
            return row
        last = run["last"]
        med = lambda d: statistics.median(d[s] for s in steps if s in d) if any(s in d for s in steps) else None  # noqa
        row.update(step_s=med(run["step_time_s"]), tokens_per_s_per_gpu=med(run["tokens_per_s"]) / ranks,
                   mfu=med(run["mfu"]), peak_gib=run["peak_gib"])
        if "forward_flops_per_seq" in last:
            row["gflop_per_token"] = 3 * last["forward_flops_per_seq"] / seq / 1e9
        per_layer = cp_bytes_per_layer(last)
        moba = [v for i, v in per_layer.items() if f"layers.{i}.attention.inner/cp_bytes_means" in last]
        dense = [v for i, v in per_layer.items() if f"layers.{i}.attention.inner/cp_bytes_means" not in last]
        row.update(moba_layer_gib=statistics.mean(moba) / GIB if moba else None,
                   dense_layer_gib=statistics.mean(dense) / GIB if dense else None,
                   step_cp_gib=sum(per_layer.values()) / GIB if per_layer else None)
        work = [(last[k + "_max"], v) for k, v in last.items() if k.endswith("/cp_work") and k + "_max" in last]
        row["work_imbalance"] = max((m / v for m, v in work if v), default=None)
        return row

    # ---- sections -----------------------------------------------------------------------------
    def long(self) -> None:
        S, cp, n = self.seq, self.cp, self.a.long_steps
        for variant in self.a.long_variants:
            ref_key = f"long/{variant}/1gpu-S{S // cp}"
            ref = self.b.launch(ref_key, self.flags(variant, S // cp, 1, n), 1)
            ref_row = self.row(variant, "1 GPU, cp 1", ref, S // cp, 1)
            self.b.res["long"].append(ref_row)
            flags = self.flags(variant, S, cp, n)
            _, reason = self.dry_run(flags, cp)
            if reason:
                self.skip("long", f"{variant} cp{cp}", reason)
                continue
            probe = ["--profile-steps", f"{n}:{n}"] if self.a.long_profile else None
            real = self.b.launch(f"long/{variant}/cp{cp}-S{S}", flags, cp, probe=probe)
            row = self.row(variant, f"cp {cp}", real, S, cp, profiled=n if probe else 0)
            if row["ok"] and ref_row["ok"]:
                row["vs_1gpu"] = row["tokens_per_s_per_gpu"] / ref_row["tokens_per_s_per_gpu"]
            if real.get("profile"):  # the profiler's view of the last step, mean over ranks
                row.update({f"profiled_{k}_s": statistics.mean(p[f"{k}_ms"] for p in real["profile"]) / 1e3
                            for k in ("nccl", "exposed", "wall")})
            if row["ok"] and variant == self.a.long_variants[0]:
                fake = self.b.launch(f"long/{variant}/cp{cp}-S{S}-skipcomm", flags, cp, probe=["--skip-cp-comm"])
                skip_row = self.row(variant, f"cp {cp}, CP transfers skipped", fake, S, cp)
                if skip_row["ok"]:
                    row["exposed_s"] = row["step_s"] - skip_row["step_s"]
                    row["exposed_frac"] = row["exposed_s"] / row["step_s"]
                self.b.res["long"] += [row, skip_row]
            else:
                self.b.res["long"].append(row)
            self.b.write()

    def mod(self) -> None:
        S, cp = self.seq, self.cp
        flags = self.flags("mod", S, cp, self.a.long_steps)
        _, reason = self.dry_run(flags, cp)
        if reason:
            return self.skip("mod", f"cp{cp}", reason)
        run = self.b.launch(f"mod/cp{cp}-S{S}", flags, cp)
        row = self.row("mod", f"cp {cp}", run, S, cp)
        cfg = self.load(flags[1], flags[2:])
        routed = selected_tokens(run["last"])
        row.update(routed_layers=len(routed), expected=cfg.mod.capacity * S / cp,
                   selected_mean=statistics.mean(a for a, _ in routed.values()) if routed else None,
                   selected_max=max((m for _, m in routed.values()), default=None))
        dense = self.find(f"long/hybrid/cp{cp}-S{S}")
        if row["ok"] and dense and dense["rc"] == 0:
            ref = self.row("hybrid", "", dense, S, cp)
            row["vs_dense"] = row["step_s"] / ref["step_s"]
            row["note"] = f"(no-MoD step {ref['step_s']:.2f} s)"
        self.b.res["mod"].append(row)
        self.b.write()

    def search(self) -> None:
        cp = self.cp
        for seq in self.a.search_lengths:
            flags = self.flags("hybrid", seq, cp, self.a.search_steps)
            gib, reason = self.dry_run(flags, cp)
            row = {"seq": seq, "ranks": cp, "dry_run_gib": gib, "limit_gib": self.limit}
            if reason is None and gib > self.limit:
                reason = f"dry run {gib:.1f} GiB a rank > {self.limit:.1f} GiB"
            if reason:
                self.skip("search", f"S{seq}", reason)
                self.b.res["search"].append({**row, "status": "skip: " + reason})
                self.b.write()
                continue
            run = self.b.res["runs"].get(f"long/hybrid/cp{cp}-S{seq}") or \
                self.b.launch(f"search/cp{cp}-S{seq}", flags, cp)
            r = self.row("hybrid", "", run, seq, cp)
            row.update({k: r.get(k) for k in ("peak_gib", "step_s", "tokens_per_s_per_gpu")},
                       status="trained" if r["ok"] else r["note"].strip("*"))
            self.b.res["search"].append(row)
            self.b.write()
            if not r["ok"]:
                break  # a longer one will not fit either

    def plan(self, which: list[str]) -> None:
        S, cp = self.seq, self.cp
        runs = []
        if "long" in which:
            for v in self.a.long_variants:
                runs += [(f"long {v} 1gpu", v, S // cp, 1), (f"long {v} cp{cp}", v, S, cp)]
                runs += [(f"long {v} cp{cp} skip-comm", v, S, cp)] if v == self.a.long_variants[0] else []
        runs += [(f"mod cp{cp}", "mod", S, cp)] if "mod" in which else []
        runs += [(f"search cp{cp}", "hybrid", s, cp) for s in self.a.search_lengths] if "search" in which else []
        if not runs:
            return
        print(f"\nlong sequences (memory limit {self.limit:.1f} GiB a rank for the search):\n"
              f"  {'run':<28} {'S':>9}  ranks  GiB/rank  status")
        for name, variant, seq, world in runs:
            gib, reason = self.dry_run(self.flags(variant, seq, world, self.a.long_steps), world)
            if reason is None and name.startswith("search") and gib > self.limit:
                reason = f"dry run {gib:.1f} GiB a rank > {self.limit:.1f} GiB"
            mem = "-" if gib is None else f"{gib:.2f}" if gib >= 1 else f"{gib:.2g}"
            print(f"  {name:<28} {seq:>9}  {world:>5}  {mem:>8}  {'run' if reason is None else 'skip: ' + reason}")
