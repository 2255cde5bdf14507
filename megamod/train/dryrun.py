"""``megamod-train --dry-run --world-size N``: plan a run for a world this machine doesn't have.

Pure arithmetic: the config is validated for ``N`` ranks, the rank grid comes from
``ParallelDims`` (no process group), the model is built on the meta device only to count its
parameters by layer. Nothing here touches torch.distributed.

Pipeline split: the trainer's own (``megamod.parallel.pipeline.stage_layers``): contiguous stages
chosen to minimise the largest stage's forward FLOPs (``megamod.model.flops.layer_forward_flops``
per block, so Mixture-of-Depths blocks are cheap), or ``--parallel.pp_layers`` when given.
The input embedding sits on stage 0 and costs 0 FLOPs (a lookup, flops.py's convention); the
final norm (elementwise, 0) and the output projection (2·S·d·V) sit on the last stage.

Memory model, bytes per rank (one rank per pipeline stage is reported; every rank of a stage is
alike). P is the rank's parameters: its stage's TP-sharded parameters / tp plus its replicated
ones (norms, MoD router and predictor) counted fully.

    bf16, master weights (ZeRO ≥ 1 by default; 16 B/param): weights 2 (bf16) + gradients 2 (bf16)
        + optimizer 12 (fp32 master copy 4, Adam m 4, v 4)
    bf16, fused master weights (one rank at ZeRO 0 by default, MasterAdamW; 16 B/param, 18 with
        gradient accumulation): as above, but with grad_accum > 1 the gradients are summed in an
        fp32 buffer (4), each bf16 gradient freed once added
    bf16 under autocast (ZeRO 0 by default, train.bf16_mode; 16 B/param): weights 4 (fp32) +
        gradients 4 + optimizer 8 (m 4, v 4); autocast's bf16 weight copies (2 B/param while a
        forward and its backward run) are not counted
    fp32 (CPU runs, 16 B/param as well):           weights 4 + gradients 4
        + optimizer 8 (m 4, v 4; the fp32 weights are their own master, no copy)

ZeRO partitions over the ZeRO group of Z = dp·cp ranks (DeepSpeed's sequence-data-parallel
group, see parallel/dims.py; Z = dp when cp = 1):
    stage 0: nothing partitioned      stage 1: optimizer / Z
    stage 2: optimizer, gradients / Z stage 3: optimizer, gradients, weights / Z

Activations per block and micro-batch (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", Table 2) on the s = train.seq_len / cp tokens a rank
holds, b = micro_batch_size, h = d_model, t = tp, in bytes (bf16, an upper bound: megamod has no
dropout masks). The paper's softmax term 5·a·s²·b is left out: every attention path here is fused
(SDPA's flash/cuDNN kernels, the MoBA kernels) and keeps O(s) statistics, not the s × s scores.

    TP, no SP, no recompute:              s·b·h·(10 + 24/t)
    TP + sequence parallel:               s·b·h·34/t
    full activation checkpointing:        2·s·b·h per block (its input; /t under SP) + one block's
                                          activations as above while it is recomputed

A MoD routed block runs on k = capacity·s tokens: the formula at s = k, plus the full-length
block input 2·s·b·h (/t under SP) it keeps for the scatter back. A stage holds its blocks'
activations for the micro-batches in flight under 1F1B: min(pp − stage, grad_accum), so pp on
stage 0 when grad_accum >= pp.

Also counted, per rank: the logits on the last stage, s·b·V/t·(2 + 4) bytes (bf16 logits and the
loss's fp32 upcast; with train.loss_chunk_tokens N, N·V/t·(2 + 4)), and under context parallelism the K/V transient of one layer: the
all-gathered K and V of the whole sequence, S·b·Hkv/t·D·2 each in bf16, their fp32 gradients in
the backward, and for GQA the heads repeated after the transfer in dense layers
(S·b·H/t·D·2 each); S = train.seq_len here. Not counted: temporary buffers, communication
buffers, fragmentation.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from megamod.config import Config, resolve_dp
from megamod.model.mod import routed_layers, routed_tokens
from megamod.parallel.pipeline import output_flops, stage_flops, stage_layers, stage_split  # noqa: F401 (re-exported)

GIB = 2 ** 30

# (weights, gradients, optimizer state) bytes per parameter; see the module docstring.
BYTES_PER_PARAM = {"bf16": (2, 2, 12), "master_fused": (2, 2, 12), "autocast": (4, 4, 8), "fp32": (4, 4, 8)}
ZERO_PARTITIONED = {0: (), 1: ("optimizer",), 2: ("optimizer", "gradients"),
                    3: ("optimizer", "gradients", "parameters")}


def training_dtype(cfg: Config) -> str:
    """train.dtype; 'auto' is bf16 unless train.device is cpu (a multi-rank plan means GPUs)."""
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    return "fp32" if cfg.train.device == "cpu" else "bf16"


def training_precision(cfg: Config, world_size: int) -> str:
    """'fp32', 'bf16' (master weights), 'master_fused' or 'autocast', as the engine will choose
    (engine.py)."""
    from megamod.train.engine import precision_for

    return precision_for(cfg, training_dtype(cfg), world_size)


def bytes_per_param(cfg: Config, precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter; see the module docstring."""
    w, g, o = BYTES_PER_PARAM[precision]
    if precision == "master_fused" and cfg.train.grad_accum > 1:
        g = 4  # the fp32 sum over micro-batches
    return w, g, o


# ---------------------------------------------------------------------------------------------
# Parameters and memory
# ---------------------------------------------------------------------------------------------

def _tp_sharded(param_name: str) -> bool:
    from megamod.parallel.tensor import TP_PLAN, Colwise, Rowwise, VocabEmbedding

    module = param_name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(module, pat) and isinstance(style, (Colwise, Rowwise, VocabEmbedding))
               for pat, style in TP_PLAN.items())


def stage_parameters(cfg: Config, stages: list[list[int]]) -> list[int]:
    """Parameters one rank of each stage holds: TP-sharded ones / tp, replicated ones in full."""
    import torch

    from megamod.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    stage_of = {i: s for s, layers in enumerate(stages) for i in layers}
    last = len(stages) - 1
    sharded, replicated = [0] * len(stages), [0] * len(stages)
    for name, p in model.named_parameters():  # a tied output weight is listed once, as the embedding
        head = name.split(".")[0]
        s = 0 if head == "tok_embeddings" else last if head in ("norm", "output") else stage_of[int(name.split(".")[1])]
        (sharded if _tp_sharded(name) else replicated)[s] += p.numel()
    if cfg.model.tie_embeddings and last > 0:
        sharded[last] += model.tok_embeddings.weight.numel()  # the last stage keeps its own copy
    tp = cfg.parallel.tp
    return [sh // tp + rep for sh, rep in zip(sharded, replicated)]


def activation_formula(cfg: Config) -> str:
    p = cfg.parallel
    base = "s·b·h·34/t (TP + sequence parallel)" if p.sequence_parallel else "s·b·h·(10 + 24/t)"
    if cfg.train.activation_checkpointing:
        sharded = "/t" if p.sequence_parallel else ""
        return f"2·s·b·h{sharded} per block (full activation checkpointing: its input) + one block's {base}"
    return f"{base} (no recompute)"


def _korthikanti(cfg: Config, s: int) -> float:
    """One block's activations on s tokens, fused attention (docstring)."""
    b, h, tp = cfg.train.micro_batch_size, cfg.model.d_model, cfg.parallel.tp
    return s * b * h * 34 / tp if cfg.parallel.sequence_parallel else s * b * h * (10 + 24 / tp)


def layer_activation_bytes(cfg: Config, layer_id: int) -> float:
    """One block, one micro-batch, on this rank's seq_len / cp tokens (docstring)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    s = t.seq_len // p.cp
    sp = p.tp if p.sequence_parallel else 1
    full_input = 2 * s * t.micro_batch_size * m.d_model / sp
    if t.activation_checkpointing:
        return full_input
    if layer_id in routed_layers(cfg):
        return _korthikanti(cfg, routed_tokens(cfg.mod.capacity, cfg.mod.window, s)) + full_input
    return _korthikanti(cfg, s)


def logits_bytes(cfg: Config) -> float:
    """The last stage's logits for one micro-batch, bf16 plus the loss's fp32 copy (docstring); with
    the chunked loss (train.loss_chunk_tokens), one chunk's."""
    t, p = cfg.train, cfg.parallel
    tokens = t.seq_len // p.cp * t.micro_batch_size
    if t.loss_chunk_tokens:
        tokens = min(tokens, t.loss_chunk_tokens)
    return tokens * cfg.model.vocab_size / p.tp * (2 + 4)


def cp_transient_bytes(cfg: Config) -> float:
    """One layer's all-gathered K/V under CP (0 at cp = 1), with their fp32 gradients and, for
    GQA in dense layers, the repeated heads (docstring)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.cp == 1:
        return 0.0
    kv = t.seq_len * t.micro_batch_size * m.n_kv_heads // p.tp * m.head_dim
    repeated = t.seq_len * t.micro_batch_size * m.n_heads // p.tp * m.head_dim if m.n_heads > m.n_kv_heads else 0
    return 2 * kv * 2 + 2 * kv * 4 + 2 * repeated * 2


@dataclass(frozen=True)
class StagePlan:
    layers: list[int]
    flops: int                # forward FLOPs per sequence
    params: int               # parameters per rank
    in_flight: int            # micro-batches whose activations are held under 1F1B
    memory: dict[str, float]  # bytes per rank: parameters, gradients, optimizer, activations, total


def plan_stages(cfg: Config, world_size: int) -> list[StagePlan]:
    p = cfg.parallel
    zero_group = resolve_dp(cfg, world_size) * p.cp
    per_param = dict(zip(("parameters", "gradients", "optimizer"),
                         bytes_per_param(cfg, training_precision(cfg, world_size))))
    partitioned = ZERO_PARTITIONED[cfg.optim.zero_stage]
    stages = stage_layers(cfg)
    plans = []
    for s, (layers, flops, params) in enumerate(zip(stages, stage_flops(cfg, stages),
                                                    stage_parameters(cfg, stages))):
        in_flight = min(p.pp - s, cfg.train.grad_accum)
        mem = {k: params * nbytes / (zero_group if k in partitioned else 1) for k, nbytes in per_param.items()}
        mem["activations"] = sum(layer_activation_bytes(cfg, i) for i in layers) * in_flight
        if cfg.train.activation_checkpointing:  # one block recomputed at a time, with its full activations
            mem["activations"] += max(_korthikanti(cfg, cfg.train.seq_len // p.cp) for _ in layers)
        mem["logits"] = logits_bytes(cfg) if s == len(stages) - 1 else 0.0
        mem["cp_kv"] = cp_transient_bytes(cfg)
        mem["total"] = sum(mem.values())
        plans.append(StagePlan(layers, flops, params, in_flight, mem))
    return plans


def memory_per_rank(cfg: Config, world_size: int, plans: list[StagePlan] | None = None) -> dict[str, float]:
    """Bytes per rank, each component at its worst stage (parameters: the largest stage;
    activations: usually stage 0, which holds the most micro-batches), so a bound for every rank."""
    plans = plan_stages(cfg, world_size) if plans is None else plans
    out = {k: max(pl.memory[k] for pl in plans)
           for k in ("parameters", "gradients", "optimizer", "activations", "logits", "cp_kv")}
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _ranks(g: list[int]) -> str:
    if len(g) > 2 and g == list(range(g[0], g[-1] + 1)):
        return f"[{g[0]}-{g[-1]}]"
    if len(g) > 6:
        return f"[{', '.join(map(str, g[:4]))}, …, {g[-1]}]"
    return f"[{', '.join(map(str, g))}]"


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def format_report(cfg: Config, world_size: int) -> str:
    from megamod.parallel.dims import ParallelDims

    p, t = cfg.parallel, cfg.train
    dp = resolve_dp(cfg, world_size)
    dims = ParallelDims(tp=p.tp, cp=p.cp, dp=dp, pp=p.pp)
    plans = plan_stages(cfg, world_size)
    dtype = training_precision(cfg, world_size)
    w, g, o = bytes_per_param(cfg, dtype)
    lines = [f"megamod dry run: model {cfg.model.flavour} ({cfg.model.n_layers} blocks"
             f"{', MoD' if cfg.mod.enabled else ''}), world size {world_size} = "
             f"tp {p.tp} × cp {p.cp} × dp {dp} × pp {p.pp} (tp varies fastest, pp slowest)",
             "", "rank grid (first groups of each kind):"]
    for name, label in (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp"), ("dp_cp", "ZeRO (dp·cp)")):
        groups = dims.group_ranks(dims.GROUPS[name])
        lines.append(f"  {label:<13} {len(groups):>4} groups of {len(groups[0]):<4} "
                     + " ".join(_ranks(gr) for gr in groups[:3]) + (" …" if len(groups) > 3 else ""))
    c0 = dims.coords(0)
    lines.append(f"  rank 0: tp {c0['tp']}, cp {c0['cp']}, dp {c0['dp']}, pp {c0['pp']}; "
                 f"rank {world_size - 1}: " + ", ".join(f"{k} {v}" for k, v in dims.coords(world_size - 1).items()))

    total = sum(pl.flops for pl in plans)
    mean = total / len(plans)
    how = ("as given by --parallel.pp_layers" if p.pp_layers else
           f"contiguous split balancing forward FLOPs per {t.seq_len}-token sequence, megamod.model.flops")
    lines += ["", f"pipeline stages ({how}; FLOPs per sequence):",
              f"  {'stage':>5}  {'blocks':<8} {'also':<22} {'GFLOP':>9} {'share':>6}  {'params/rank':>12}"]
    for s, pl in enumerate(plans):
        also = ", ".join((["embedding"] if s == 0 else []) + (["norm, output"] if s == len(plans) - 1 else []))
        lines.append(f"  {s:>5}  {_span(pl.layers):<8} {also or '-':<22} {pl.flops / 1e9:>9.1f} "
                     f"{pl.flops / total:>6.1%}  {pl.params:>12,d}")
    lines.append(f"  max/mean FLOPs {max(pl.flops for pl in plans) / mean:.3f}")

    zero = cfg.optim.zero_stage
    lines += ["", f"memory per rank, GiB: {dtype} Adam, {w} weights + {g} gradients + {o} optimizer = "
                  f"{w + g + o} B/param; ZeRO-{zero} over dp·cp = {dp * p.cp} ranks "
                  f"(partitioned: {', '.join(ZERO_PARTITIONED[zero]) or 'nothing'})",
              f"  {'stage':>5}  {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'logits':>7} {'cp K/V':>7} "
              f"{'total':>7}  micro-batches held"]
    cols = ("parameters", "gradients", "optimizer", "activations", "logits", "cp_kv", "total")
    for s, pl in enumerate(plans):
        lines.append(f"  {s:>5}  " + " ".join(f"{pl.memory[k] / GIB:>7.2f}" for k in cols) + f"  {pl.in_flight}")
    worst = memory_per_rank(cfg, world_size, plans)
    lines.append(f"  {'bound':>5}  " + " ".join(f"{worst[k] / GIB:>7.2f}" for k in cols)
                 + "  (each column at its worst stage)")
    lines += [f"  activations: Korthikanti et al. 2022 with fused attention, {activation_formula(cfg)} bytes per "
              f"block and micro-batch, s = seq_len/cp = {t.seq_len // p.cp}, b {t.micro_batch_size}, "
              f"h {cfg.model.d_model}, t {p.tp}; × blocks on the stage × micro-batches held under 1F1B "
              f"(min(pp − stage, grad_accum)); logits s·b·V/t·6 on the last stage (one chunk's with the chunked loss); cp K/V: one layer's "
              f"all-gathered K/V of all {t.seq_len} tokens with fp32 gradients; buffers not counted"]
    if p.pp > 1 and t.grad_accum < p.pp:
        lines.append(f"  warning: train.grad_accum {t.grad_accum} < pp {p.pp} micro-batches: the 1F1B pipeline "
                     f"is mostly bubble; raise --train.grad_accum")
    return "\n".join(lines)
