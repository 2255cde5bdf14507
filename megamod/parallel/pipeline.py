"""Pipeline parallelism: which blocks each stage holds, the stage's slice of the model, and a 1F1B
schedule that drives one DeepSpeed engine per stage.

Why our own schedule and not DeepSpeed's ``PipelineModule``/``PipelineEngine`` (the spike, read
against DeepSpeed 0.19.8's source and tried on CPU/gloo):

- ``PipelineEngine`` asserts ZeRO < 2 (runtime/pipe/engine.py). One engine per stage is an
  ordinary DeepSpeed engine over a smaller module, so ZeRO-1 and ZeRO-2 both work with PP here
  (ZeRO-3 is refused: it would all-gather every stage's weights per micro-batch and is untested).
- ``PipelineModule`` wants the model as a flat list of ``LayerSpec``s and names parameters by list
  position (``3.attention.wq.weight``, saved as ``layer_03-model_00-model_states.pt``): names and
  checkpoints would depend on the split. Ours keeps ``GPT`` as it is and only drops the modules a
  stage does not hold, so ``layers.7.attention.wq.weight`` is the same name at every PP degree and
  a checkpoint resumes at any other (through DeepSpeed's universal checkpoint, reshard.py).
- ``train_batch()`` owns the data iterator, the loss and evaluation; our trainer keeps its loop,
  its metrics and MoD's routing modes, and the schedule below is ~150 lines we can read.

The schedule (Narayanan et al. 2021, PipeDream-flush "1F1B"; Megatron's non-interleaved one):
stage s runs ``pp - s - 1`` warm-up forwards, then alternates one forward and one backward, then
drains the remaining backwards, so at most ``pp - s`` micro-batches hold activations. Stages pass
one tensor (B, S, d) — S/cp under context parallelism, /tp under sequence parallelism — to the same TP/DP coordinates of
the next stage; sends and receives that face each other are posted together so blocking
transports cannot deadlock. MoD's auxiliary losses stay inside their stage (``AuxLossInjection``
adds their gradient in the block's backward), so nothing else crosses stages.

Gradient accumulation: the last stage backpropagates ``loss / grad_accum`` through
``engine.backward`` (DeepSpeed's scaling); other stages backpropagate the received gradient with
the surrogate ``(y · g).sum()`` and ``scale_wrt_gas=False`` (∂/∂y of it is exactly g, already
scaled). ``engine.step()`` follows every backward, so DeepSpeed's micro-step counter and ZeRO's
reduction at the accumulation boundary behave as without PP.

Tied embeddings: stage 0 owns the shared matrix (it is in stage 0's optimizer only, so AdamW,
weight decay, the clipping norm and the checkpoint see it once, as on one device). The last stage
holds a copy for its output projection that no optimizer sees: it accumulates the copy's
gradient over the micro-batches and sends the sum to stage 0, which adds it inside its last
backward (the surrogate gains ``(W · g_out).sum()``, so ZeRO-2's in-backward reduction sees the
full gradient); after the optimizer step stage 0 sends the updated matrix back. One matrix each
way per step, point to point, like Megatron's embedding-group all-reduce.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megamod.config import Config
from megamod.model.gpt import GPT
from megamod.parallel.context import shard_batch, zigzag_positions
from megamod.parallel.dims import ParallelDims
from megamod.model.flops import layer_forward_flops

# ---------------------------------------------------------------------------------------------
# The split: contiguous stages balanced by estimated forward FLOPs (or given per stage)
# ---------------------------------------------------------------------------------------------


def output_flops(cfg: Config) -> int:
    """Forward FLOPs of the output projection per sequence (the final norm is elementwise: 0)."""
    return 2 * cfg.train.seq_len * cfg.model.d_model * cfg.model.vocab_size


def stage_flops(cfg: Config, stages: list[list[int]]) -> list[int]:
    """Forward FLOPs per sequence of each stage, the output projection on the last. The input
    embedding is a lookup (0 FLOPs, flops.py's convention)."""
    s = cfg.train.seq_len
    out = [sum(layer_forward_flops(cfg, i, s) for i in layers) for layers in stages]
    out[-1] += output_flops(cfg)
    return out


def stage_split(cfg: Config) -> list[list[int]]:
    """Contiguous, non-empty stages of block ids minimising the largest stage's FLOPs (a MoD
    block at capacity c costs about c of a dense one, flops.py).

    Dynamic programme over (stages used, blocks covered): O(pp·L²), exact. Ties keep the
    earliest cut, so the split is deterministic."""
    n, pp = cfg.model.n_layers, cfg.parallel.pp
    costs = [layer_forward_flops(cfg, i, cfg.train.seq_len) for i in range(n)]
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    tail = output_flops(cfg)

    def cost(i: int, j: int) -> int:  # blocks [i, j) as one stage; the last stage carries the output
        return prefix[j] - prefix[i] + (tail if j == n else 0)

    inf = float("inf")
    # best[k][j]: the smallest max-stage cost of blocks [0, j) in k stages; cut[k][j]: its last cut.
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0
    for k in range(1, pp + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], cost(i, j))
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    stages, j = [], n
    for k in range(pp, 0, -1):
        i = cut[k][j]
        stages.append(list(range(i, j)))
        j = i
    return stages[::-1]


def stage_layers(cfg: Config) -> list[list[int]]:
    """The blocks of every stage: ``parallel.pp_layers`` (blocks per stage) when given, else the
    FLOPs-balanced split. config.validate checks the explicit counts."""
    counts = cfg.parallel.pp_layers
    if not counts:
        return stage_split(cfg)
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [list(range(a, a + c)) for a, c in zip(starts, counts)]


def apply_pp(model: GPT, cfg: Config, dims: ParallelDims) -> None:
    """Keep this stage's blocks (names unchanged), the embedding on stage 0 and norm + output on
    the last; in place, on the meta device. No-op for pp=1.

    With tied embeddings the last stage's ``output.weight`` becomes a copy that no optimizer
    sees (``model.pipeline_tied_copy``): see the module docstring."""
    if dims.pp == 1:
        return
    stage = dims.coords()["pp"]
    keep = {str(i) for i in stage_layers(cfg)[stage]}
    for name in [n for n in model.layers if n not in keep]:
        del model.layers[name]
    first, last = stage == 0, stage == dims.pp - 1
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm, model.output = None, None
    model.pipeline_tied_copy = last and cfg.model.tie_embeddings


def tied_copy(model: GPT) -> torch.nn.Parameter | None:
    """The last stage's copy of the tied embedding (None elsewhere, and at pp=1)."""
    return model.output.weight if getattr(model, "pipeline_tied_copy", False) else None


def mark_tied_copy(model: GPT) -> None:
    """After the model is materialised (``to_empty`` makes new Parameter objects): flag the copy
    so that param_groups (engine.py) leaves it out of the optimizer and DeepSpeed's gradient
    norms skip it (``ds_pipe_replicated``, DeepSpeed's own flag for pipeline-tied weights)."""
    p = tied_copy(model)
    if p is not None:
        p.pipeline_tied_copy = True
        p.ds_pipe_replicated = True


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------


class PipelineSchedule:
    """1F1B training steps and forward-only evaluation for this rank's stage (pp > 1)."""

    def __init__(self, cfg: Config, dims: ParallelDims, model: GPT, engine: Any, loss_fn, device: torch.device):
        c = dims.coords()
        self.engine, self.model, self.loss_fn, self.device = engine, model, loss_fn, device
        self.stage, self.stages = c["pp"], dims.pp
        self.is_first, self.is_last = self.stage == 0, self.stage == dims.pp - 1
        self.group = dims.group("pp")
        peer = lambda s: dims.rank_of(**{**c, "pp": s})  # noqa: E731  same tp/cp/dp coordinates
        self.prev = None if self.is_first else peer(self.stage - 1)
        self.next = None if self.is_last else peer(self.stage + 1)
        self.first_rank, self.last_rank = peer(0), peer(dims.pp - 1)
        t, m = cfg.train, cfg.model
        sp = dims.tp if cfg.parallel.sequence_parallel else 1
        self.act_shape = (t.micro_batch_size, t.seq_len // dims.cp // sp, m.d_model)  # (B, S/cp, /tp under SP, d)
        self.cp, self.cp_rank = dims.cp, c["cp"]
        # RoPE needs positions (stages get hidden states): under CP this rank's zigzag positions
        self.positions = zigzag_positions(t.seq_len, dims.cp, c["cp"], device=device)
        self.grad_accum = t.grad_accum
        self.tied = cfg.model.tie_embeddings
        self.guard_loss = lambda loss: loss  # the trainer's step guard (train/guard.py) wraps the last stage's loss

    @property
    def act_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype  # the engine's compute dtype (bf16 on GPU)

    # ---- point to point -------------------------------------------------------------------------
    def _exchange(self, send: list[tuple[torch.Tensor, int]], recv: list[int],
                  like: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Post every send and receive together, then wait for all (send_forward_recv_backward and
        friends in Megatron): two stages facing each other never both block in a send. Received
        tensors are activations, or shaped like ``like`` (the tied embedding)."""
        bufs = [torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device) if like is None
                else torch.empty_like(like, memory_format=torch.contiguous_format) for _ in recv]
        ops = [dist.P2POp(dist.isend, t.contiguous(), peer, self.group) for t, peer in send]
        ops += [dist.P2POp(dist.irecv, b, peer, self.group) for b, peer in zip(bufs, recv)]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return bufs

    def _recv_forward(self) -> torch.Tensor | None:
        return None if self.is_first else self._exchange([], [self.prev])[0]

    def _send_forward(self, y: torch.Tensor) -> None:
        if not self.is_last:
            self._exchange([(y, self.next)], [])

    def _recv_backward(self) -> torch.Tensor | None:
        return None if self.is_last else self._exchange([], [self.next])[0]

    def _send_backward(self, g: torch.Tensor | None) -> None:
        if not self.is_first:
            self._exchange([(g, self.prev)], [])

    def _send_forward_recv_backward(self, y: torch.Tensor) -> torch.Tensor | None:
        return None if self.is_last else self._exchange([(y, self.next)], [self.next])[0]

    def _send_backward_recv_forward(self, g: torch.Tensor | None) -> torch.Tensor | None:
        if self.is_first:
            return None
        return self._exchange([(g, self.prev)], [self.prev])[0]

    # ---- compute --------------------------------------------------------------------------------
    def _forward(self, batch: torch.Tensor, x: torch.Tensor | None, grad: bool = True) -> tuple[Any, torch.Tensor]:
        """x: the received activation (None on stage 0, which reads the tokens). Returns the
        stage's input leaf (for its gradient) and its output: hidden states, or the loss on the
        last stage."""
        tokens, targets, _ = shard_batch(batch, self.cp, self.cp_rank)  # (B, S/cp) each
        if self.is_first:
            x = tokens
        elif grad:
            x.requires_grad_(True)
        out = self.engine(x, self.positions)
        if self.is_last:
            out = self.loss_fn(out, targets)
        return x, out

    def _backward(self, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor | None,
                  extra: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.is_last:
            self.engine.backward(self.guard_loss(out))  # loss / grad_accum: DeepSpeed's accumulation scaling
        else:
            surrogate = (out * g).sum()  # ∂/∂out = g, which already carries the 1/grad_accum
            if extra is not None:
                surrogate = surrogate + extra
            self.engine.backward(surrogate, scale_wrt_gas=False)
        return None if self.is_first else x.grad

    def train_step(self, batches: Iterator[torch.Tensor]) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches. Returns the mean LM loss on the last
        stage, 0 elsewhere (the trainer sums over the pipeline group)."""
        m = self.grad_accum
        data = [next(batches).to(self.device, non_blocking=True) for _ in range(m)]  # every stage draws the same
        warmup = min(self.stages - self.stage - 1, m)
        in_flight: deque = deque()
        losses: list[torch.Tensor] = []
        done = 0  # backwards run so far

        def forward(j: int, x: torch.Tensor | None) -> torch.Tensor:
            x, out = self._forward(data[j], x)
            in_flight.append((x, out))
            if self.is_last:
                losses.append(out.detach())
            return out

        def backward(g: torch.Tensor | None) -> torch.Tensor | None:
            nonlocal done
            x, out = in_flight.popleft()
            done += 1
            final = done == m
            extra = None
            if final and self.tied and self.is_first:
                w = self.model.tok_embeddings.weight
                g_out = self._exchange([], [self.last_rank], like=w)[0]
                extra = (w * g_out).sum()  # the output projection's gradient of the shared matrix
            grad_in = self._backward(x, out, g, extra)
            if not final:
                self.engine.step()  # not the boundary: DeepSpeed only counts the micro-step
            return grad_in

        for j in range(warmup):
            self._send_forward(forward(j, self._recv_forward()).detach())
        remaining = m - warmup
        x = self._recv_forward() if remaining else None
        for i in range(remaining):
            out = forward(warmup + i, x)
            g = self._send_forward_recv_backward(out.detach()) if not self.is_last else None
            grad_in = backward(g)
            if i == remaining - 1:
                self._send_backward(grad_in)
            else:
                x = self._send_backward_recv_forward(grad_in)
        for _ in range(warmup):
            self._send_backward(backward(self._recv_backward()))

        copy = tied_copy(self.model)
        if copy is not None:  # gradient of the shared matrix from the output side, to stage 0
            self._exchange([(copy.grad, self.first_rank)], [])
            copy.grad = None
        self.engine.step()  # the accumulation boundary: ZeRO reduction, clipping, AdamW
        self.sync_tied_weights()
        if self.is_last:
            return torch.stack(losses).mean()
        return torch.zeros((), device=self.device)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward only, one micro-batch through every stage; the loss on the last, 0 elsewhere."""
        batch = batch.to(self.device)
        _, out = self._forward(batch, self._recv_forward(), grad=False)
        if self.is_last:
            return out
        self._send_forward(out)
        return torch.zeros((), device=self.device)

    # ---- the tied embedding ---------------------------------------------------------------------
    @torch.no_grad()
    def sync_tied_weights(self) -> None:
        """Stage 0's shared matrix -> the last stage's copy (after every optimizer step, after
        building and after loading a checkpoint). No-op without tied embeddings."""
        if not self.tied:
            return
        if self.is_first:
            self._exchange([(self.model.tok_embeddings.weight.detach(), self.last_rank)], [])
        elif self.is_last:
            copy = tied_copy(self.model)
            copy.copy_(self._exchange([], [self.first_rank], like=copy)[0])
