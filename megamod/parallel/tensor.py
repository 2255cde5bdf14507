"""Tensor (and sequence) parallelism applied from outside: a plan keyed by module name, one pass.

``apply_tp(model, dims)`` runs on the meta-device model (before ``to_empty``/``init_weights``)
and swaps ``nn.Linear``/``nn.Embedding`` for the explicit parallel layers of ``tp_layers``,
following ``TP_PLAN`` (torchtitan's ``layer_plan``, gpt-fast's ``_apply_tp_linear``). Module
and parameter names do not change, so checkpoints keep their keys at every TP degree. The model
file never learns the TP degree: its reshapes use -1 for heads.

Regions, per block (SP: sequence parallel; shapes per rank):

    h (B,S,d) | SP: (B,S/tp,d)      residual stream, norms: replicated | sharded along S
      attention / feed_forward      enter: copy_to_tp | gather_seq          -> (B,S,d)
        wq wk wv / w1 w3            column-parallel, local                  -> (B,S,H/tp·D) / (B,S,F/tp)
        wo / w2                     row-parallel, exit: all-reduce | reduce-scatter -> (B,S,d) | (B,S/tp,d)
    tok_embeddings                  vocab-parallel, exit like a row-parallel layer
    output                          enters like attention, column-parallel -> logits (B,S,V/tp),
                                    consumed by the vocab-parallel cross-entropy (no gather)

Entering a region is a forward pre-hook on the module that owns the column-parallel linears
(torchtitan's PrepareModuleInput), so wq/wk/wv share one all-gather, not three.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from megamod.parallel.dims import ParallelDims
from megamod.parallel.routed_sp import apply_routed_sp
from megamod.parallel.tp_layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                        all_reduce_clone, copy_to_tp, gather_seq)


@dataclass(frozen=True)
class EnterRegion:
    """Forward pre-hook: the module's first input becomes the full activation of a TP region
    (copy_to_tp, or gather_seq under SP)."""


@dataclass(frozen=True)
class Colwise:
    """ColumnParallelLinear; ``enter``: also enter the region here (no parent does it)."""

    enter: bool = False


@dataclass(frozen=True)
class Rowwise:
    """RowParallelLinear: reduce (all-reduce, or reduce-scatter under SP) on the way out."""


@dataclass(frozen=True)
class VocabEmbedding:
    """VocabParallelEmbedding: reduce like a row-parallel layer."""


Style = EnterRegion | Colwise | Rowwise | VocabEmbedding

# Module name (fnmatch glob over ``named_modules()``) -> style. Q, K, V and the SwiGLU gate/up
# projections split their outputs (heads / hidden units); the attention output and down
# projections split their inputs and reduce; embedding and output split the vocabulary.
TP_PLAN: dict[str, Style] = {
    "tok_embeddings": VocabEmbedding(),
    "layers.*.attention": EnterRegion(),
    "layers.*.attention.wq": Colwise(),
    "layers.*.attention.wk": Colwise(),
    "layers.*.attention.wv": Colwise(),
    "layers.*.attention.wo": Rowwise(),
    "layers.*.feed_forward": EnterRegion(),
    "layers.*.feed_forward.w1": Colwise(),
    "layers.*.feed_forward.w3": Colwise(),
    "layers.*.feed_forward.w2": Rowwise(),
    "output": Colwise(enter=True),
}


def _style_for(name: str, plan: dict[str, Style]) -> tuple[str, Style] | None:
    hits = [(pattern, style) for pattern, style in plan.items() if fnmatch.fnmatchcase(name, pattern)]
    if len(hits) > 1:
        raise ValueError(f"TP plan: module {name!r} matches several entries {[p for p, _ in hits]}")
    return hits[0] if hits else None


def _enter_hook(group, sequence_parallel: bool):
    enter = gather_seq if sequence_parallel else copy_to_tp

    def hook(module: nn.Module, args: tuple) -> tuple:
        return (enter(args[0], group), *args[1:])

    return hook


def _check_divisible(name: str, size: int, world: int, what: str) -> None:
    if size % world:
        raise ValueError(f"TP: {name} has {size} {what}, not divisible by tp={world} (config.validate should "
                         f"have refused this)")


def apply_tp(model: nn.Module, dims: ParallelDims, sequence_parallel: bool = False,
             plan: dict[str, Style] = TP_PLAN) -> None:
    """In place, on the meta device (also works on a materialised model, but then the new
    layers are uninitialised: call ``init_weights`` after). No-op for tp=1."""
    if dims.tp == 1:
        return
    group, rank, world = dims.group("tp"), dims.coords()["tp"], dims.tp
    # MoD routed blocks under SP: their compacted k tokens are replicated, so inside them the
    # regions are plain TP (routed_sp.py).
    routed = apply_routed_sp(model, group, rank) if sequence_parallel else set()
    hits = {pattern: 0 for pattern in plan}
    for name, module in list(model.named_modules()):
        found = _style_for(name, plan)
        if found is None:
            continue
        pattern, style = found
        hits[pattern] += 1
        sp = sequence_parallel and not any(name.startswith(r + ".") for r in routed)
        if isinstance(style, EnterRegion):
            module.register_forward_pre_hook(_enter_hook(group, sp))
            continue
        if isinstance(style, Colwise):
            _check_divisible(name, module.out_features, world, "output features")
            new: nn.Module = ColumnParallelLinear(module, group, rank, world)
            if style.enter:
                new.register_forward_pre_hook(_enter_hook(group, sp))
        elif isinstance(style, Rowwise):
            _check_divisible(name, module.in_features, world, "input features")
            new = RowParallelLinear(module, group, rank, world, sp)
        else:
            _check_divisible(name, module.num_embeddings, world, "vocabulary entries")
            new = VocabParallelEmbedding(module, group, rank, world, sequence_parallel)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    # A renamed module must fail here, not train silently unsharded. Top-level entries may be
    # absent on a pipeline stage; per-layer entries must hit every layer the stage holds.
    n_layers = len(getattr(model, "layers", {}))
    missing = [p for p, n in hits.items() if p.startswith("layers.") and n != n_layers]
    if missing:
        raise ValueError(f"TP plan entries {missing} did not match every layer; module names changed?")
    if sequence_parallel:
        model.register_forward_pre_hook(_full_sequence_positions, with_kwargs=True)
        model.register_forward_pre_hook(partial(_sum_replicated_grads_over_tp, group=group))


def _full_sequence_positions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Under SP the embedding hands each rank S/tp tokens, so ``GPT.forward``'s default
    arange(h.shape[1]) would number them 0..S/tp-1. RoPE is applied inside the TP regions, which
    see all S tokens (all-gathered), so they need the whole sequence's positions: fill them in
    from the token ids (B, S) when the caller gave none. (A later pipeline stage receives hidden
    states, already S/tp long: pipeline parallelism must pass positions explicitly.)"""
    given = args[1] if len(args) >= 2 else kwargs.get("positions")
    if given is not None:
        return args, kwargs
    tokens = args[0] if args else kwargs["tokens"]
    positions = torch.arange(tokens.shape[1], device=tokens.device)  # (S,)
    if len(args) >= 2:
        return (args[0], positions, *args[2:]), kwargs
    return args, {**kwargs, "positions": positions}


def _sum_replicated_grads_over_tp(module: nn.Module, args: tuple, group) -> None:
    """Under SP every replicated parameter of the model (the norm gains) acts on this rank's
    S/tp tokens only, so its gradient is a partial sum over the sequence: all-reduce it over TP.
    (Without SP they see the full, replicated activations and their gradients are already equal
    on every TP rank; DeepSpeed then counts them once in the grad norm, on TP rank 0.) A tensor hook runs before the gradient is accumulated, so
    DeepSpeed's own hooks (ZeRO-1/2 reduce and partition inside backward) see the full sum.
    Registered lazily at forward because ``to_empty`` replaces the parameters (dropping hooks)
    after ``apply_tp`` ran; the flag makes it once per parameter object. The norms inside MoD
    routed blocks act on replicated tokens (routed_sp.py): whole gradients, left alone."""
    whole = {id(p) for m in module.modules() if hasattr(m, "replicated_compute_params")
             for p in m.replicated_compute_params()}
    for p in module.parameters():
        if (p.requires_grad and id(p) not in whole and not getattr(p, "tensor_model_parallel", False)
                and not getattr(p, "sequence_parallel", False)):
            p.register_hook(partial(all_reduce_clone, group=group))
            p.sequence_parallel = True  # Megatron's name for "gradient summed over TP"


# ---------------------------------------------------------------------------------------------
# Sharding metadata for checkpoints (DeepSpeed universal checkpoints, consolidation, tests)
# ---------------------------------------------------------------------------------------------

def shard_dims(model: nn.Module, plan: dict[str, Style] = TP_PLAN) -> dict[str, int | None]:
    """Parameter name -> the dim TP splits it on (None: replicated). Pure function of the plan
    and the module names, so it is the same at every TP degree (tp=1 included)."""
    out: dict[str, int | None] = {}
    for mod_name, module in model.named_modules():
        found = _style_for(mod_name, plan)
        style = found[1] if found else None
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            out[full] = {Colwise: 0, VocabEmbedding: 0, Rowwise: 1}.get(type(style))
    return out


def universal_checkpoint_info(model: nn.Module, plan: dict[str, Style] = TP_PLAN) -> dict:
    """What DeepSpeed's ds_to_universal needs to merge TP slices (``model.universal_checkpoint_info``
    is saved with every checkpoint): row-parallel weights concatenate on dim 1, replicated ones
    are taken once (and checked equal), everything else concatenates on dim 0."""
    from deepspeed.checkpoint.constants import (PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                                                TP_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    dims = shard_dims(model, plan)
    exact = lambda names: [f"^{re.escape(n)}$" for n in sorted(names)]  # noqa: E731
    return {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        TP_REPLICATED_PARAMETER_PATTERNS: exact(n for n, d in dims.items() if d is None),
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: exact(n for n, d in dims.items() if d == 1),
    }


def shard_tensor(full: torch.Tensor, dim: int | None, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of a full (tp=1) tensor."""
    return full if dim is None else full.chunk(world, dim=dim)[rank]
