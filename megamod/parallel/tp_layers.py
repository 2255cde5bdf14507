"""Tensor- and sequence-parallel building blocks: Megatron-LM's mappings, layers and loss.

Notation: B batch, S sequence, d model width, V vocabulary, H heads; ``X/tp`` is a size TP has
sharded. Activations are batch-first (B, S, ...), so sequence parallelism (SP) shards dim 1
(Megatron keeps [S, B, h] and shards dim 0; batch-first costs one transpose-copy around each
sequence collective, which keeps the model file in the layout everyone else uses).

The four collectives, as autograd functions (forward / backward):

    copy_to_tp          identity           / all-reduce          enter a TP region, input replicated
    reduce_from_tp      all-reduce         / identity            leave a TP region, output replicated
    gather_seq          all-gather S       / reduce-scatter S    enter a TP region from an SP region
    reduce_scatter_seq  reduce-scatter S   / all-gather S        leave a TP region into an SP region
    gather_seq_replicated  all-gather S    / own S/tp slice      SP values used replicated (MoD logits)

(Under SP the replicated norm gains see S/tp tokens each, so their gradients are summed over TP
by a hook: see ``tensor._sum_replicated_grads_over_tp``.)

SP replaces each all-reduce of a TP region's exit by reduce-scatter + (next region's) all-gather:
same bytes moved, but norms and residual adds in between run on S/tp tokens.

Every sharded parameter carries ``tensor_model_parallel = True`` (what DeepSpeed's
``is_model_parallel_parameter`` reads, so grad norms sum it over TP instead of counting it once)
and ``tp_shard = (dim, rank, world)`` (what ``GPT.init_weights`` reads to keep its slice of the
full-size draw). ``nn.Module.to_empty``/``.to`` create new Parameter objects and drop attributes,
so the layers re-tag their parameters after every ``_apply``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamod.compat import all_gather_single, reduce_scatter_single



# ---------------------------------------------------------------------------------------------
# Collectives along the sequence dim (dim 1)
# ---------------------------------------------------------------------------------------------

def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S/tp, ...) -> (B, S, ...), rank r's chunk at position r."""
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # (tp·B, S/tp, ...)
    all_gather_single(out, x.contiguous(), group=group)
    return out.unflatten(0, (world, x.shape[0])).movedim(0, 1).flatten(1, 2)  # (B, tp·S/tp, ...)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S, ...) partial sums -> (B, S/tp, ...) summed over the group, rank r keeps chunk r."""
    world = dist.get_world_size(group)
    b, s = x.shape[:2]
    chunks = x.unflatten(1, (world, s // world)).movedim(1, 0).flatten(0, 1).contiguous()  # (tp·B, S/tp, ...)
    out = torch.empty((b, *chunks.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, chunks, group=group)
    return out


def all_reduce_clone(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``x`` over ``group``, in a new tensor (``x`` is left alone)."""
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce_clone(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_clone(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        # Each rank's TP region used the whole sequence, so each holds a partial gradient for
        # every token: sum them and keep this rank's S/tp.
        return _reduce_scatter_seq(g, ctx.group), None


class _GatherSeqReplicated(_GatherSeq):
    @staticmethod
    def backward(ctx, g):
        # Every rank used the gathered tensor identically (replicated computation), so every rank
        # holds the same, whole gradient: keep this rank's S/tp, no reduction.
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return g.chunk(world, dim=1)[rank].contiguous(), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_seq(g, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSeq.apply(x, group)


def gather_seq_replicated(x: torch.Tensor, group) -> torch.Tensor:
    """all-gather S / keep own S/tp of the gradient: for small per-token values (MoD router
    logits) that every TP rank then uses in the same replicated computation."""
    return _GatherSeqReplicated.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterSeq.apply(x, group)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

class _TPModule(nn.Module):
    """Holds the TP coordinates and re-tags sharded parameters after every ``_apply``."""

    sharded: dict[str, int] = {}  # parameter name -> the dim TP splits

    def __init__(self, group, rank: int, world: int) -> None:
        super().__init__()
        self.group, self.tp_rank, self.tp_world = group, rank, world

    def _tag(self) -> None:
        for name, dim in self.sharded.items():
            p = getattr(self, name)
            p.tensor_model_parallel = True
            p.tp_shard = (dim, self.tp_rank, self.tp_world)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._tag()
        return out

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.sharded)
        return f"{shapes}, tp_rank={self.tp_rank}/{self.tp_world}"


class _TPLinear(_TPModule):
    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's product x Wᵀ, no communication: the seam FP8 training replaces
        (parallel/fp8.py), so the collectives around it stay as they are."""
        return F.linear(x, self.weight)


class ColumnParallelLinear(_TPLinear):
    """y = x Aᵀ with A's output rows split: weight (out/tp, in). Local compute only: the input
    must already be the full, replicated activation (the region's entry hook did the collective),
    and the output stays sharded on its last dim (heads, hidden units or vocabulary)."""

    sharded = {"weight": 0}

    def __init__(self, linear: nn.Linear, group, rank: int, world: int) -> None:
        super().__init__(group, rank, world)
        if linear.bias is not None:
            raise NotImplementedError("ColumnParallelLinear: the model has no biases; add sharding for them here")
        out, d_in = linear.weight.shape
        self.weight = nn.Parameter(torch.empty(out // world, d_in, device=linear.weight.device,
                                               dtype=linear.weight.dtype))
        self._tag()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_linear(x)  # (B, S, out/tp)


class RowParallelLinear(_TPLinear):
    """y = x Aᵀ with A's input columns split: weight (out, in/tp). Input is sharded on its last
    dim (the previous column-parallel output); each rank's product is a partial sum, reduced on
    the way out: all-reduce -> (B, S, out), or under SP reduce-scatter -> (B, S/tp, out)."""

    sharded = {"weight": 1}

    def __init__(self, linear: nn.Linear, group, rank: int, world: int, sequence_parallel: bool) -> None:
        super().__init__(group, rank, world)
        if linear.bias is not None:
            raise NotImplementedError("RowParallelLinear: the model has no biases; a bias must be added after the reduce")
        out, d_in = linear.weight.shape
        self.weight = nn.Parameter(torch.empty(out, d_in // world, device=linear.weight.device,
                                               dtype=linear.weight.dtype))
        self.sequence_parallel = sequence_parallel
        self._tag()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.local_linear(x)  # (B, S, out), summed over TP ranks below
        if self.sequence_parallel:
            return reduce_scatter_seq(partial, self.group)  # (B, S/tp, out)
        return reduce_from_tp(partial, self.group)


class VocabParallelEmbedding(_TPModule):
    """Embedding rows split by vocabulary: rank r holds ids [r·V/tp, (r+1)·V/tp). Ids outside the
    range look up zeros; summing over TP ranks (all-reduce, or reduce-scatter along S under SP)
    gives every token exactly its one row."""

    sharded = {"weight": 0}

    def __init__(self, emb: nn.Embedding, group, rank: int, world: int, sequence_parallel: bool) -> None:
        super().__init__(group, rank, world)
        v, d = emb.weight.shape
        self.num_local = v // world
        self.vocab_start = rank * self.num_local
        self.weight = nn.Parameter(torch.empty(self.num_local, d, device=emb.weight.device, dtype=emb.weight.dtype))
        self.sequence_parallel = sequence_parallel
        self._tag()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.num_local)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, S, d)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)  # also zeroes the gradient to row 0
        if self.sequence_parallel:
            return reduce_scatter_seq(h, self.group)  # (B, S/tp, d)
        return reduce_from_tp(h, self.group)


# ---------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy: never materialises (B, S, V)
# ---------------------------------------------------------------------------------------------

class _VocabParallelCE(torch.autograd.Function):
    """Per-token CE from logits sharded on V: log Σ_v exp(z_v − m) − (z_t − m), with the max m,
    Σ exp and the target logit each reduced over TP (two small all-reduces of B·S floats).
    Backward is local: softmax − one_hot(target), restricted to this rank's vocabulary."""

    @staticmethod
    def forward(ctx, logits, targets, group):
        in_dtype = logits.dtype
        z = logits.float()
        v_local = z.shape[-1]
        start = dist.get_rank(group) * v_local
        m = z.max(dim=-1).values  # (B, S)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)
        local_t = targets - start
        outside = (local_t < 0) | (local_t >= v_local)
        local_t = local_t.masked_fill(outside, 0)
        target_z = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = z.exp_()  # reuse the buffer: (B, S, V/tp)
        sums = torch.stack([exp.sum(-1), target_z])  # (2, B, S): one all-reduce for both
        dist.all_reduce(sums, group=group)
        sum_exp, target_z = sums
        loss = sum_exp.log() - target_z
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, outside)  # softmax shard
        ctx.in_dtype = in_dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, outside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(~outside).unsqueeze(-1).to(grad.dtype))
        grad.mul_(g.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    """logits (..., V/tp) sharded over ``group`` by vocabulary, targets (...) global ids -> (...)
    per-token loss in fp32, identical on every rank of the group."""
    return _VocabParallelCE.apply(logits, targets, group)


# ---------------------------------------------------------------------------------------------
# Randomness that must differ across TP ranks
# ---------------------------------------------------------------------------------------------

class TPRNGTracker:
    """A second RNG stream, seeded per TP rank, for randomness that must *differ* across a TP
    group: dropout on sharded activations (heads or hidden units inside a TP region, tokens
    inside an SP region). The default stream stays *equal* on every rank of the group (the
    Trainer seeds it with train.seed everywhere), for randomness that must agree: dropout on
    replicated activations, random MoD routing. Megatron's CudaRNGStatesTracker, CPU and CUDA.

    Sharded *init* needs neither: ``GPT.init_weights`` draws each parameter full-size from its
    own (seed, name) generator and keeps the slice, so tp=N starts as exactly tp=1, sharded.
    The model has no dropout today; ``fork()`` is where it would go.
    """

    OFFSET = 2718  # Megatron's: keeps the TP stream clear of the default stream's seed

    def __init__(self, seed: int, tp_rank: int) -> None:
        self.seed = seed + self.OFFSET + tp_rank
        self._cuda = torch.cuda.is_available()
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self._cuda else []):
            torch.manual_seed(self.seed)
            self._state = self._get()

    def _get(self):
        return (torch.get_rng_state(), torch.cuda.get_rng_state() if self._cuda else None)

    @contextlib.contextmanager
    def fork(self):
        """Draws inside use (and advance) the per-rank stream; the default stream is untouched."""
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self._cuda else []):
            torch.set_rng_state(self._state[0])
            if self._cuda:
                torch.cuda.set_rng_state(self._state[1])
            yield
            self._state = self._get()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "state": self._state}

    def load_state_dict(self, sd: dict) -> None:
        self.seed, self._state = sd["seed"], sd["state"]
