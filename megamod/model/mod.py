"""Mixture-of-Depths (Raposo et al., 2024): blocks that process only some tokens of each sequence.

DESIGN.md (section MoD) is the specification. Notation: B batch, S sequence, d width,
k = max(1, floor(capacity · S)) tokens per sequence (a Python int fixed by S, so torch.compile and
CUDA graphs see static shapes in training).

A ``RoutedBlock`` is a ``Block`` (same parameter names, so a TP plan keyed by ``attention.wq`` or
``feed_forward.w1`` covers it unchanged) plus ``router`` (Linear d→1, no bias) and optionally a
``predictor`` (a small MLP on stop-gradient inputs). Its ``routing_mode`` is set for the whole
model by ``set_routing`` (or the ``routing`` context manager):

- ``"topk"`` (training, evaluation): per sequence the k highest router logits, ties to the lower
  position, kept in original order. Non-causal: whether token t is chosen depends on later tokens.
- ``"causal"`` (sampling): a token goes through the block iff sigmoid(prediction) > 0.5, where the
  prediction is the predictor's logit, or the router's own logit when there is no predictor (then
  the router BCE loss is what makes it causal-ready). Counts vary per sequence: dynamic shapes,
  used by evaluation and generation only. With a KV cache, skipped tokens write no entry.

The auxiliary losses (router BCE with top-k membership targets, predictor BCE) never leave the
block: their gradient is injected at the block output by an identity-forward autograd function
(Megatron's MoEAuxLossAutoScaler, torchtitan's AuxLossInjection), so ``forward`` returns a single
tensor and pipeline stages need no extra plumbing.

Parallelism, applied from outside. Plain TP needs nothing here: x is replicated over the TP group,
so every rank computes the same logits and selects the same tokens (router and predictor are
replicated), and the TP plan's per-block entries shard attention/MLP as in a dense block. Sequence
parallelism replaces three seams of routed blocks (megamod/parallel/routed_sp.py):
- ``scores(x)``: (B, S, d) -> (B, S, n) fp32 per-token logits (router, predictor). Under SP x is
  (B, S/tp, d): all-gather this output along S (n floats a token, never the d activations), so
  every TP rank selects identical tokens; that gather's backward keeps the local slice (the aux
  losses on the gathered logits are replicated over TP ranks, not partial sums).
- ``take(x, idx)`` / ``put(x, idx, delta)``: gather the selected rows; add ``delta`` back onto them.
  Under SP a rank holds only some selected rows: take = fill own rows of a zero (B, k, d) + all-
  reduce over TP; put = add own rows. Inside the block the compacted (B, k, d) input is then
  replicated, so its attention/feed_forward enter with copy_to_tp (not gather_seq) and its
  row-parallel outputs all-reduce (not reduce-scatter).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megamod.config import Config, ModConfig, ModelConfig
from megamod.model.block import Block

RoutingMode = str  # "topk" | "causal"
_MODES = ("topk", "causal")


def routed_layers(cfg: Config) -> list[int]:
    """Indices of the routed blocks: mod.layers if given, else every mod.every-th block
    (every-1, 2·every-1, …); block 0 is never chosen by mod.every (DESIGN.md: always full)."""
    if not cfg.mod.enabled:
        return []
    if cfg.mod.layers:
        return sorted({i % cfg.model.n_layers for i in cfg.mod.layers})
    e = cfg.mod.every
    return [i for i in range(1, cfg.model.n_layers) if i % e == e - 1]


def capacity_tokens(capacity: float, seq_len: int) -> int:
    """k = max(1, floor(capacity · S)) tokens per sequence (DESIGN.md, MoD)."""
    return max(1, math.floor(capacity * seq_len))


def routed_tokens(capacity: float, window: int, seq_len: int) -> int:
    """Tokens a routed block processes per sequence: k = max(1, floor(capacity · W)) per window of
    W = window tokens (0: the whole sequence), S / W windows."""
    w = window or seq_len
    return seq_len // w * capacity_tokens(capacity, w)


def topk_in_windows(scores: torch.Tensor, capacity: float, window: int) -> torch.Tensor:
    """scores (B, S) -> (B, S/W · k) positions: the top k = max(1, floor(capacity · W)) of every
    window of W consecutive tokens (W = window, 0: the whole sequence), ascending. The same W
    gives the same choice wherever the windows are cut out of the sequence (context parallelism
    routes the windows each rank holds)."""
    b, s = scores.shape
    w = window or s
    k = capacity_tokens(capacity, w)
    if w == s:
        return topk_positions(scores, k)
    idx = topk_positions(scores.reshape(b * (s // w), w), k)  # (B·S/W, k) inside each window
    offsets = torch.arange(0, s, w, device=scores.device).repeat(b)[:, None]  # each window's first position
    return (idx + offsets).reshape(b, -1)


def predictor_hidden(mod: ModConfig, d_model: int) -> int:
    """mod.predictor_hidden, or d/8 when it is 0."""
    return mod.predictor_hidden or max(1, d_model // 8)


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (B, S) -> (B, k) positions of the k largest per row, ascending (original order).

    A stable descending sort breaks ties towards the lower position, deterministically on every
    device (torch.topk does not promise any tie order)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, S)
    return order[:, :k].sort(dim=1).values


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (B, k) of t, which is (S, ...) shared by the batch or (B, S, ...) -> (B, k, ...)."""
    if t.dim() == idx.dim():  # (S, D/2) tables shared by every sequence
        return t[idx]
    return t.gather(1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand(*idx.shape, *t.shape[2:]))


def project_to_one(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """(..., d) -> (..., 1): ``linear(x)`` for a bias-free Linear(d, 1), as a multiply and a sum
    over d. As a matrix product with one output column it costs a GEMV forward and, backward, an
    outer product (a K=1 GEMM, cuBLAS's slowest "align1" kernels, measured at 32 us on an H100
    for (16384, 2048)) plus an add of that into the residual's gradient; compiled, the
    multiply-reduce is one reduction kernel forward and its input gradient g·w fuses into that add."""
    return (x * linear.weight[0]).sum(-1, keepdim=True)


class AuxLossInjection(torch.autograd.Function):
    """Identity on ``x``; in backward, also sends d(aux)=scale into ``aux``'s graph.

    Equivalent to adding ``scale · aux`` to the loss that is backpropagated through ``x``, without
    returning ``aux`` from the model. ``scale`` matches how the loss is scaled before backward
    (1 / grad_accum: DeepSpeed divides the LM loss by it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class Predictor(nn.Module):
    """Causal routing predictor: a token's own (stop-gradient) input -> logit of top-k membership."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_model, hidden)
        # No bias on the 1-wide output: DeepSpeed packs bf16 parameters back to back in one flat
        # buffer, and a 1-element tensor would shift every later parameter off 16-byte alignment
        # (cuBLAS then drops to slow kernels; inductor's addmm faults with "misaligned address").
        self.out = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project_to_one(F.silu(self.hidden(x)), self.out)


# Statistics kept on the device between log intervals, one vector per kind of forward:
_STATS = ("forwards", "selected", "tokens", "logit_sum", "logit_sq_sum", "router_bce", "predictor_bce",
          "predictor_correct", "flips")


class RoutedBlock(Block):
    """A Block that processes k tokens per sequence: x + g(r)·f(x_sel) on them, x elsewhere."""

    def __init__(self, cfg: ModelConfig, inner_attention: nn.Module, mod: ModConfig) -> None:
        super().__init__(cfg, inner_attention)
        self.capacity, self.window = mod.capacity, mod.window
        self.gate = mod.gate
        self.aux_loss_weight = mod.aux_loss_weight
        learned = mod.routing == "learned"
        self.router = nn.Linear(cfg.d_model, 1, bias=False) if learned else None
        with_predictor = learned and mod.predictor
        self.predictor = Predictor(cfg.d_model, predictor_hidden(mod, cfg.d_model)) if with_predictor else None
        self.routing_mode: RoutingMode = "topk"  # set model-wide by set_routing
        self.aux_loss_scale = 1.0  # set by set_aux_loss_scale (1 / grad_accum)
        self._stats: dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        kind = "random" if self.router is None else f"learned, gate={self.gate}"
        return f"capacity={self.capacity}, {kind}, routing={self.routing_mode}"

    # ---- seams (see the module docstring) ------------------------------------------------------
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, d) -> (B, S, n) fp32: [router logit, predictor logit] (learned), or one Gaussian
        score per token (random routing; drawn from the default generator of x's device, which the
        trainer seeds and checkpoints, and activation checkpointing replays)."""
        if self.router is None:
            return torch.randn(*x.shape[:2], 1, device=x.device)
        r = project_to_one(x, self.router)  # (B, S, 1)
        if self.predictor is None:
            return r.float()
        return torch.cat([r, self.predictor(x.detach())], dim=-1).float()  # (B, S, 2)

    def take(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return _rows(x, idx)  # (B, k, d)

    def put(self, x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor,
            valid: torch.Tensor | None = None) -> torch.Tensor:
        """x + delta on the selected rows; the others are copied, bit for bit. ``valid`` (B, k):
        rows of ``idx`` that are padding (causal routing) add nothing."""
        if valid is not None:
            delta = delta.masked_fill(~valid.unsqueeze(-1), 0.0)
        # x's dtype: under autocast the residual stream is fp32 and delta bf16 (CUDA autocast
        # promotes scatter_add's inputs itself, CPU autocast does not)
        return x.scatter_add(1, idx.unsqueeze(-1).expand_as(delta), delta.to(x.dtype))

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None) -> torch.Tensor:
        """x (B, S, d); cos/sin (S, D/2) or (B, S, D/2) at the tokens' original positions."""
        if self.routing_mode == "causal":
            return self._forward_causal(x, cos, sin, kv)
        if kv is not None:
            raise RuntimeError("KV-cache decoding needs causal routing: set_routing(model, 'causal')")
        scores = self.scores(x)  # (B, S, n)
        idx, valid, member = self.select(scores)  # (B, k) positions; which rows are real; top-k membership
        # Causal attention over the compacted tokens, in original order, is causal by original
        # position; RoPE rotates them by their original positions.
        f = self.residual(self.take(x, idx), _rows(cos, idx), _rows(sin, idx))  # (B, k, d)
        out = self.put(x, idx, self._gated(scores, idx, f), valid)
        return self._losses_and_stats(out, scores, member, idx, valid)

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The top-k seam: (idx (B, k) positions to process, ascending; valid (B, k) or None when
        every row is real; top-k membership (B, S) float, the router BCE's target). k from the
        scores' length: the whole sequence even where x holds a shard of it (SP). Context
        parallelism's global mode replaces this (parallel/routed_cp.py)."""
        idx = topk_in_windows(scores[..., 0], self.capacity, self.window)
        b, s = scores.shape[:2]
        return idx, None, torch.zeros(b, s, device=scores.device).scatter_(1, idx, 1.0)

    def _gated(self, scores: torch.Tensor, idx: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """g(r)·f: multiplying by the router logit is what puts the router on the LM loss's
        gradient path (top-k indices carry none). Random routing: multiplier 1."""
        if self.router is None:
            return f
        r = scores[..., 0].gather(1, idx)  # (B, k)
        g = torch.sigmoid(r) if self.gate == "sigmoid" else r
        return g.to(f.dtype).unsqueeze(-1) * f

    def _causal_logit(self, scores: torch.Tensor) -> torch.Tensor:
        return scores[..., 1] if self.predictor is not None else scores[..., 0]  # (B, S)

    def _losses_and_stats(self, out: torch.Tensor, scores: torch.Tensor, target: torch.Tensor, idx: torch.Tensor,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
        """target: top-k membership (B, S); valid: which rows of idx were processed (None: all)."""
        processed = target if valid is None else torch.zeros_like(target).scatter_(1, idx, valid.float())
        if self.router is None:
            self._record(scores, processed, target, None, None)
            return out
        r = scores[..., 0]
        router_bce = F.binary_cross_entropy_with_logits(r, target)
        predictor_bce = (F.binary_cross_entropy_with_logits(scores[..., 1], target)
                         if self.predictor is not None else None)
        if self.training and torch.is_grad_enabled():
            aux = None
            if self.aux_loss_weight > 0:
                aux = self.aux_loss_weight * router_bce
            if predictor_bce is not None:  # reaches only the predictor (its input is detached)
                aux = predictor_bce if aux is None else aux + predictor_bce
            if aux is not None:
                out = AuxLossInjection.apply(out, aux, self.aux_loss_scale)
        self._record(scores, processed, target, router_bce, predictor_bce)
        return out

    def _forward_causal(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv) -> torch.Tensor:
        if self.router is None:
            raise RuntimeError("random routing has no causal router; causal routing needs --mod.routing learned")
        scores = self.scores(x)
        chosen = self._causal_logit(scores) > 0  # sigmoid(prediction) > 0.5, (B, S)
        count = chosen.sum(1)  # (B,)
        n = int(count.max())  # host sync: fine outside training
        b, s = chosen.shape
        if n > 0:
            # Chosen positions first, in original order; rows past a sequence's count are padding.
            # Padding sits after every real token, so causal attention keeps it out of their view.
            idx = torch.sort(chosen.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n]
            valid = torch.arange(n, device=x.device) < count[:, None]  # (B, n)
            step_kv = kv.select(idx, valid) if kv is not None else None
            f = self.residual(self.take(x, idx), _rows(cos, idx), _rows(sin, idx), step_kv)
            out = self.put(x, idx, self._gated(scores, idx, f), valid)
        else:
            out = x  # nothing routed in: the block is skipped (and its cache is untouched)
        if kv is None:  # evaluation's statistics; decoding keeps none (kernels a skipped block would launch)
            target = torch.zeros(b, s, device=x.device).scatter_(1, topk_in_windows(scores[..., 0], self.capacity,
                                                                                    self.window), 1.0)
            self._record(scores, chosen.float(), target, None, None)
        return out

    # ---- statistics (device tensors until log time) ------------------------------------------------
    def _record(self, scores: torch.Tensor, processed: torch.Tensor, target: torch.Tensor,
                router_bce: torch.Tensor | None, predictor_bce: torch.Tensor | None) -> None:
        """Accumulate one forward's statistics under "train" (training forwards), "eval" (top-k
        evaluation) or "causal". ``processed``: the tokens that went through; ``target``: top-k
        membership. The vector is computed in the block's graph (torch.compile fuses it into a
        few reductions); only the accumulation runs eagerly."""
        kind = "causal" if self.routing_mode == "causal" else "train" if self.training else "eval"
        with torch.no_grad():
            zero = scores.new_zeros(())
            r = scores[..., 0]
            has_router = self.router is not None
            causal = (self._causal_logit(scores) > 0).float() if has_router else target
            vec = torch.stack([
                scores.new_ones(()), processed.sum(), scores.new_full((), float(r.numel())),  # no host->device copy
                r.sum() if has_router else zero, (r * r).sum() if has_router else zero,
                router_bce.detach() if router_bce is not None else zero,
                predictor_bce.detach() if predictor_bce is not None else zero,
                (causal == target).sum() if self.predictor is not None else zero,
                (causal != target).sum(),
            ])
        self._accumulate(kind, vec)

    @torch.compiler.disable
    def _accumulate(self, kind: str, vec: torch.Tensor) -> None:
        """Skipped during activation-checkpoint recomputation, which runs inside backward and
        would count a forward twice."""
        if torch._C._current_graph_task_id() != -1:
            return
        prev = self._stats.get(kind)
        self._stats[kind] = vec if prev is None else prev + vec

    def pop_stats(self, kind: str) -> dict[str, float]:
        """Averages since the last pop of this kind (one host sync); {} when nothing ran."""
        vec = self._stats.pop(kind, None)
        if vec is None:
            return {}
        v = dict(zip(_STATS, vec.tolist()))
        n, tokens = v["forwards"], v["tokens"]
        out = {"fraction_processed": v["selected"] / tokens, "selected_tokens": v["selected"] / n}
        if self.router is not None:
            mean = v["logit_sum"] / tokens
            out.update(router_logit_mean=mean,
                       router_logit_std=math.sqrt(max(0.0, v["logit_sq_sum"] / tokens - mean * mean)),
                       flip_rate=v["flips"] / tokens)
            if kind != "causal":
                out["router_bce"] = v["router_bce"] / n
        if self.predictor is not None:
            out["predictor_accuracy"] = v["predictor_correct"] / tokens
            if kind != "causal":
                out["predictor_bce"] = v["predictor_bce"] / n
        return out

    def log_metrics(self) -> dict[str, float]:
        """The trainer's logging hook: training forwards since the last log interval.

        fraction_processed (k/S in training), selected_tokens (per micro-batch on this rank),
        router logit mean/std, the unweighted aux losses, predictor accuracy against top-k
        membership, and flip_rate: the fraction of tokens whose causal decision (predictor, or
        router sign without one) differs from top-k membership."""
        return self.pop_stats("train")


# ---- model-level switches ------------------------------------------------------------------------

def routed_blocks(model: nn.Module) -> dict[str, RoutedBlock]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutedBlock)}


def has_causal_routing(model: nn.Module) -> bool:
    """True when the model has routed blocks and all of them can route causally (learned)."""
    blocks = routed_blocks(model).values()
    return bool(blocks) and all(b.router is not None for b in blocks)


def set_routing(model: nn.Module, mode: RoutingMode) -> None:
    """Route every RoutedBlock by ``"topk"`` (training-style) or ``"causal"`` (sampling-style)."""
    if mode not in _MODES:
        raise ValueError(f"routing mode {mode!r}; choose one of {_MODES}")
    for name, block in routed_blocks(model).items():
        if mode == "causal" and block.router is None:
            raise RuntimeError(f"{name}: random routing has no causal router (--mod.routing learned needed)")
        block.routing_mode = mode


@contextlib.contextmanager
def routing(model: nn.Module, mode: RoutingMode) -> Iterator[None]:
    previous = {name: b.routing_mode for name, b in routed_blocks(model).items()}
    set_routing(model, mode)
    try:
        yield
    finally:
        for name, b in routed_blocks(model).items():
            b.routing_mode = previous[name]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Scale of the injected aux-loss gradients: 1 / grad_accum, as DeepSpeed scales the LM loss."""
    for block in routed_blocks(model).values():
        block.aux_loss_scale = scale


def evaluate_causal_routing(model: nn.Module, eval_loss) -> dict[str, float]:
    """After a top-k evaluation pass: its predictor statistics, then ``eval_loss()`` again with
    causal routing, its flip rate and processed fraction. Means over routed layers."""
    blocks = routed_blocks(model).values()
    topk = [b.pop_stats("eval") for b in blocks]
    for b in blocks:
        b.pop_stats("causal")  # drop anything left over from outside evaluation
    with routing(model, "causal"):
        loss = eval_loss()
    causal = [b.pop_stats("causal") for b in blocks]
    out = {"val_loss_causal": loss}

    def mean(rows: list[dict[str, float]], key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None

    for name, rows, key in (("mod_predictor_accuracy", topk, "predictor_accuracy"),
                            ("mod_flip_rate_topk", topk, "flip_rate"),
                            ("mod_flip_rate_causal", causal, "flip_rate"),
                            ("mod_fraction_causal", causal, "fraction_processed")):
        v = mean(rows, key)
        if v is not None:
            out[name] = v
    return out
