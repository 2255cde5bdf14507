"""Planning a sweep: budgets × sizes × variants -> a manifest of ordinary megamod runs.

Width/depth rule (nanochat's): a size is its depth L. d_model = aspect·L (aspect 64), heads of
head_dim 64 (n_heads = n_kv_heads = d_model / head_dim), SwiGLU hidden = 8/3·d_model rounded up
to a multiple of 64; vocabulary, sequence length, batch and learning rate come from the base
config and are the same for every size.

Which sizes: for a budget C the expected optimum is Chinchilla's 20 tokens per parameter, counted
in FLOPs: a model costing F FLOPs per training token (the trainer's analytic FLOPs, attention,
routed blocks, MoBA's gate and the output layer included) has N_f = F/6 "FLOPs parameters", and
C = F·D with D = 20·N_f gives N_f* = sqrt(C/120). A group's ``sizes`` depths are those nearest a
geometric grid of ratio ``spacing`` (2) in N_f centred on N_f* — of the variant's own FLOPs, so a
MoD variant (cheaper per token) gets more parameters — and for routed (MoD) variants moved up
``mod_shift`` (half) a grid step more: wider on the large side, where the MoD paper finds its
isoFLOP optimum. ``depths: [...]`` lists sizes explicitly instead.

Steps: a run's FLOPs per step come from megamod/model/flops.py for the run's exact config (the
number the trainer logs), steps = round(C / FLOPs per step), and the run is kept only if
steps·FLOPs per step is within ``tolerance`` (1%) of C and steps >= ``min_steps``; --train.steps is
set to it, so the cosine schedule ends at the run's last step (train/engine.py, lr_lambda). 6·N·D
(N the non-embedding parameters, D the tokens) is recorded beside the exact count. A config that
cannot hit its budget, or that config.validate refuses, is listed in ``infeasible`` with the reason.
Scaling groups (``tokens_per_param: k``) instead train each size on D = k · N tokens (N the
non-embedding parameters): MoBA's scaling-law setup, one budget per size.

Pieces: runs are packed in plan order into pieces of at most ``piece_s`` estimated GPU seconds
(FLOPs / ``assume_tflops`` + ``overhead_s`` per run for start-up and evaluation), so a sweep can be
run piece by piece; within a group the sizes nearest the expected optimum come first.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from megamod.config import Config, ConfigError, load_config, validate
from megamod.model.flops import forward_flops_per_sequence, train_flops_per_step
from megamod.train.isoflop.results import budget_tag

MANIFEST_VERSION = 1

# Named variants: trainer flags on top of the base config (a spec's ``variants:`` adds or replaces).
VARIANTS: dict[str, list[str]] = {
    "dense": [],
    "full": [],  # dense attention, the name MoBA's charts use
    "mod": ["--mod.enabled", "true", "--mod.capacity", "0.125", "--mod.every", "2"],
    "mod50": ["--mod.enabled", "true", "--mod.capacity", "0.5", "--mod.every", "2"],
    "mod50_random": ["--mod.enabled", "true", "--mod.capacity", "0.5", "--mod.every", "2", "--mod.routing", "random"],
    "moba": ["--model.attention", "moba", "--moba.chunk_size", "512", "--moba.topk", "3"],
}


class PlanError(ValueError):
    """A sweep spec that cannot be planned; the message names the key to fix."""


@dataclass
class Rule:
    aspect: int = 64  # d_model = aspect · n_layers
    head_dim: int = 64
    ffn_multiple: int = 64
    spacing: float = 2.0  # ratio of N_f between neighbouring sizes
    mod_shift: float = 0.5  # grid steps a routed variant's sizes move up
    max_layers: int = 64

    def shape(self, n_layers: int) -> dict[str, int]:
        d = self.aspect * n_layers
        heads = max(1, d // self.head_dim)
        ffn = -(-8 * d // (3 * self.ffn_multiple)) * self.ffn_multiple
        return {"d_model": d, "n_layers": n_layers, "n_heads": heads, "n_kv_heads": heads, "ffn_hidden": ffn}


@dataclass
class Group:
    name: str
    variants: list[str]
    budgets: list[float] = field(default_factory=list)  # isoFLOP: every size at every budget
    tokens_per_param: float = 0.0  # scaling: each size on D = k·N tokens
    sizes: int = 4
    depths: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [1])
    overrides: list[str] = field(default_factory=list)
    new_piece: bool = False


@dataclass
class Spec:
    config: str
    groups: list[Group]
    overrides: list[str] = field(default_factory=list)
    rule: Rule = field(default_factory=Rule)
    variants: dict[str, list[str]] = field(default_factory=dict)
    min_steps: int = 50
    tolerance: float = 0.01
    warmup: float = 0.0  # < 1: a fraction of each run's steps; >= 1: steps; 0: the config's
    world_size: int = 1
    assume_tflops: float = 350.0
    overhead_s: float = 20.0
    piece_s: float = 300.0


def _dataclass_from(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise PlanError(f"{where} must be a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise PlanError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    return raw


def spec_from_dict(raw: dict[str, Any]) -> Spec:
    raw = dict(_dataclass_from(Spec, raw, "sweep spec"))
    if "config" not in raw or "groups" not in raw:
        raise PlanError("sweep spec needs 'config' (the base trainer config) and 'groups'")
    groups = []
    for i, g in enumerate(raw.pop("groups")):
        g = dict(_dataclass_from(Group, g, f"groups[{i}]"))
        g.setdefault("name", f"group{i}")
        if "variants" not in g:
            raise PlanError(f"groups[{i}] ({g['name']}) needs 'variants'")
        g["budgets"] = [float(b) for b in g.get("budgets", [])]
        g["overrides"] = [str(a) for a in g.get("overrides", [])]
        groups.append(Group(**g))
    rule = Rule(**_dataclass_from(Rule, raw.pop("rule", {}), "rule"))
    raw["overrides"] = [str(a) for a in raw.get("overrides", [])]
    spec = Spec(groups=groups, rule=rule, **raw)
    known = {**VARIANTS, **spec.variants}
    for g in spec.groups:
        if bool(g.budgets) == bool(g.tokens_per_param):
            raise PlanError(f"group {g.name}: give either 'budgets' (isoFLOP) or 'tokens_per_param' (scaling)")
        if g.tokens_per_param and not g.depths:
            raise PlanError(f"group {g.name}: a scaling group (tokens_per_param) needs explicit 'depths'")
        bad = [v for v in g.variants if v not in known]
        if bad:
            raise PlanError(f"group {g.name}: unknown variant {bad[0]!r}; known: {', '.join(sorted(known))} "
                            f"(define it under 'variants:')")
        if not g.depths and g.sizes < 1:
            raise PlanError(f"group {g.name}: 'sizes' must be >= 1")
    if not 0 < spec.tolerance < 1:
        raise PlanError(f"tolerance {spec.tolerance} must be in (0, 1)")
    return spec


def read_document(path: str, what: str, hint: str) -> Any:
    """A YAML (or JSON, which YAML reads too) file, or a PlanError naming it and ``hint``."""
    import yaml

    try:
        with open(path) as f:
            return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise PlanError(f"{what} {path}: no such file ({hint})") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{what} {path}: not valid YAML or JSON ({e})") from None


def load_spec(path: str) -> Spec:
    return spec_from_dict(read_document(path, "sweep spec", "see benchmarks/isoflop_h200.yaml") or {})


def size_flags(shape: dict[str, int]) -> list[str]:
    return [x for k, v in shape.items() for x in (f"--model.{k}", str(v))]


def flops_params(cfg: Config) -> float:
    """N_f: training FLOPs per token / 6."""
    return forward_flops_per_sequence(cfg) / cfg.train.seq_len / 2


def parameter_counts(cfg: Config) -> tuple[int, int]:
    """(total, non-embedding) of the run's exact model (MoD routers included), from a meta build;
    non-embedding leaves out the input embedding only (gpt.count_parameters' convention)."""
    import torch

    from megamod.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    emb = model.tok_embeddings.weight.numel()
    return total, total if cfg.model.tie_embeddings else total - emb


def _with_shape(cfg: Config, shape: dict[str, int]) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **shape))


def choose_depths(cfg: Config, rule: Rule, budget: float, n: int, routed: bool) -> list[int]:
    """``n`` depths nearest the rule's grid around N_f* = sqrt(C/120) (module docstring), in
    priority order (nearest the centre first)."""
    centre = math.log(math.sqrt(budget / 120)) + (rule.mod_shift * math.log(rule.spacing) if routed else 0.0)
    logs = {L: math.log(flops_params(_with_shape(cfg, rule.shape(L)))) for L in range(1, rule.max_layers + 1)}
    offsets = sorted(range(n), key=lambda i: (abs(i - (n - 1) / 2), i))
    chosen: list[int] = []
    for i in offsets:
        target = centre + (i - (n - 1) / 2) * math.log(rule.spacing)
        free = [L for L in logs if L not in chosen]
        if free:
            chosen.append(min(free, key=lambda L: abs(logs[L] - target)))
    return chosen


def _warmup_flags(spec: Spec, steps: int) -> list[str]:
    if not spec.warmup:
        return []
    w = spec.warmup * steps if spec.warmup < 1 else spec.warmup
    return ["--optim.warmup_steps", str(max(1, round(w)))]


def plan_run(spec: Spec, group: Group, variant: str, budget: float | None, depth: int, seed: int) -> dict[str, Any]:
    """One run's manifest entry; ``reason`` is set when it cannot be run as asked."""
    shape = spec.rule.shape(depth)
    flags = [*spec.overrides, *group.overrides, *{**VARIANTS, **spec.variants}[variant], *size_flags(shape),
             "--train.seed", str(seed)]
    tag = budget_tag(budget) if budget else f"t{group.tokens_per_param:g}"
    entry: dict[str, Any] = {"name": f"{tag}-{variant}-d{shape['d_model']}-l{depth}-s{seed}", "group": group.name,
                             "kind": "isoflop" if budget else "scaling", "variant": variant, "seed": seed, **shape}
    try:
        cfg = load_config(spec.config, flags)
        t = cfg.train
        entry["seq_len"] = t.seq_len
        sequences = t.micro_batch_size * t.grad_accum * (spec.world_size // max(1, cfg.parallel.tp * cfg.parallel.pp
                                                                                  * cfg.parallel.cp))
        per_step = train_flops_per_step(cfg, sequences)
        total, non_emb = parameter_counts(cfg)
        tokens_per_step = sequences * t.seq_len
        target = budget if budget else group.tokens_per_param * non_emb * per_step / tokens_per_step
        steps = max(1, round(target / per_step))
        entry.update(params=total, non_embedding_params=non_emb, flops_per_step=per_step,
                     tokens_per_step=tokens_per_step, steps=steps,
                     forward_flops_per_seq=forward_flops_per_sequence(cfg), flops_params=flops_params(cfg))
        error = abs(steps * per_step - target) / target
        entry.update(budget_flops=float(budget) if budget else float(steps * per_step), flops=steps * per_step,
                     budget_error=error, tokens=steps * tokens_per_step,
                     flops_6n=6.0 * non_emb * steps * tokens_per_step)
        flags += ["--train.steps", str(steps), *_warmup_flags(spec, steps)]
        cfg = load_config(spec.config, flags)
        validate(cfg, spec.world_size)
        if steps < spec.min_steps:
            raise ConfigError(f"the budget is only {steps} steps of {per_step:.3g} FLOPs (< min_steps "
                              f"{spec.min_steps}): use a larger budget or a smaller batch")
        if budget and error > spec.tolerance:
            raise ConfigError(f"{steps} steps of {per_step:.3g} FLOPs miss the budget by {100 * error:.1f}% "
                              f"(> {100 * spec.tolerance:g}%): use a larger budget or a smaller batch")
        if steps <= cfg.optim.warmup_steps:
            raise ConfigError(f"{steps} steps is not longer than the {cfg.optim.warmup_steps} warm-up steps")
    except ConfigError as e:
        entry["reason"] = str(e)
    entry["args"] = flags
    return entry


def plan(spec: Spec) -> dict[str, Any]:
    load_config(spec.config, spec.overrides)  # a bad base config or flag fails here, once
    runs, infeasible = [], []
    for g in spec.groups:
        first = True
        budgets: list[float | None] = list(g.budgets) or [None]
        group_runs: list[tuple[int, dict[str, Any]]] = []
        for budget in budgets:
            for vi, variant in enumerate(g.variants):
                cfg = load_config(spec.config, [*spec.overrides, *g.overrides, *{**VARIANTS, **spec.variants}[variant]])
                routed = cfg.mod.enabled
                depths = g.depths or choose_depths(cfg, spec.rule, budget, g.sizes, routed)
                for priority, depth in enumerate(depths):
                    for seed in g.seeds:
                        entry = plan_run(spec, g, variant, budget, depth, seed)
                        if "reason" in entry:
                            infeasible.append(entry)
                        else:
                            group_runs.append((priority, entry))
        for _, entry in sorted(group_runs, key=lambda pe: pe[0]):  # stable: budget, variant order kept
            entry["new_piece"] = g.new_piece and first
            first = False
            runs.append(entry)
    names = [r["name"] for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PlanError(f"two groups plan the same run {dup[0]}: give one of them other seeds or sizes")
    manifest = {"version": MANIFEST_VERSION, "config": spec.config, "world_size": spec.world_size,
                "assume_tflops": spec.assume_tflops, "overhead_s": spec.overhead_s, "piece_s": spec.piece_s,
                "runs": runs, "infeasible": infeasible}
    assign_pieces(manifest)
    return manifest


def estimated_s(manifest: dict[str, Any], run: dict[str, Any]) -> float:
    return run["flops"] / (manifest["assume_tflops"] * 1e12) + manifest["overhead_s"]


def assign_pieces(manifest: dict[str, Any]) -> None:
    """Greedy packing in plan order; a run longer than a piece gets a piece of its own."""
    piece, used = 1, 0.0
    for r in manifest["runs"]:
        est = estimated_s(manifest, r)
        if used and (used + est > manifest["piece_s"] or r.pop("new_piece", False)):
            piece, used = piece + 1, 0.0
        r.pop("new_piece", None)
        r["piece"], r["est_gpu_s"] = piece, est
        used += est


def add_seed_repeats(manifest: dict[str, Any], rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """For every (variant, budget) of the table's isoFLOP runs, the lowest-loss run again with
    another seed (the seed-noise check at the minima), appended as a piece of its own."""
    by_name = {r["name"]: r for r in manifest["runs"]}
    best: dict[tuple[str, float], tuple[dict[str, Any], float]] = {}
    for row in rows:
        run = by_name.get(row["name"])
        if run is None or run["group"] == "repeat" or run["kind"] != "isoflop":
            continue  # not this manifest's, a repeat already, or a scaling run
        key = (run["variant"], run["budget_flops"])
        if key not in best or row["loss"] < best[key][1]:
            best[key] = (run, row["loss"])
    added = []
    piece = max((r["piece"] for r in manifest["runs"]), default=0) + 1
    for run, _ in best.values():
        twin = dict(run, group="repeat", seed=seed, piece=piece)
        twin["name"] = run["name"].rsplit("-s", 1)[0] + f"-s{seed}"
        twin["args"] = [*run["args"], "--train.seed", str(seed)]
        if twin["name"] not in by_name:
            manifest["runs"].append(twin)
            added.append(twin)
    return added


def manifest_path_dir(path: str) -> str:
    """The default sweep directory of a manifest: runs/isoflop/{file name without extension}."""
    return os.path.join("runs", "isoflop", os.path.splitext(os.path.basename(path))[0])
