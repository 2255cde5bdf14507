"""The training loop on a DeepSpeed engine.

Split as torchtitan's: ``forward_backward_step`` (one micro-batch), ``train_step`` (one optimizer
step over grad_accum micro-batches), ``train`` (the loop: logging, evaluation, checkpoints, stop
requests). Loss values stay on the device between log intervals, so the loop does not sync
every step. Under pipeline parallelism ``train_step`` hands the micro-batches to the stage's
1F1B schedule instead (parallel/pipeline.py), which drives the same engine calls.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megamod.config import Config, ConfigError
from megamod.model.gpt import GPT, build_model
from megamod.model.mod import evaluate_causal_routing, has_causal_routing, set_aux_loss_scale
from megamod.model.transforms import apply_activation_checkpointing, apply_compile, compile_loss
from megamod.parallel.context import shard_batch
from megamod.parallel.dims import ParallelDims
from megamod.parallel.fp8 import apply_fp8, check_fp8_support
from megamod.parallel.loss import LossFn, build_loss_fn
from megamod.parallel.parallelize import parallelize_model
from megamod.parallel.pipeline import PipelineSchedule, mark_tied_copy
from megamod.train import checkpoint as ckpt
from megamod.train.data import build_train_valid, micro_batches
from megamod.train.engine import build_engine, resolve_dtype
from megamod.train.guard import StepGuard
from megamod.model.flops import forward_flops_per_sequence, peak_flops, train_flops_per_step
from megamod.train.metrics import MetricsLogger
from megamod.train.signals import StopController, requeue_slurm_job


@dataclass
class Trainer:
    # configuration and topology
    cfg: Config
    dims: ParallelDims
    device: torch.device
    # model and optimisation (the engine owns optimizer, scheduler, ZeRO state, clipping)
    model: GPT
    loss_fn: LossFn
    engine: Any
    # data
    train_data: Any
    valid_data: Any
    # progress and I/O
    state: ckpt.TrainState
    metrics: MetricsLogger
    stop: StopController
    # pipeline parallelism: this stage's schedule (None at pp=1)
    pipeline: PipelineSchedule | None = None
    # skips steps with a non-finite loss or gradient on any rank (guard.py); built by ``build``
    guard: StepGuard | None = None

    @functools.cached_property
    def step_flops(self) -> int:
        """Analytic training FLOPs of one optimizer step over the global batch (model/flops.py)."""
        t = self.cfg.train
        return train_flops_per_step(self.cfg, t.micro_batch_size * t.grad_accum * self.dims.dp)

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.train.run_dir, "checkpoints")

    @classmethod
    def build(cls, cfg: Config, dims: ParallelDims, device: torch.device,
              stop: StopController | None = None) -> "Trainer":
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, device=device, parallelize=lambda m: parallelize_model(m, cfg, dims))
        if cfg.train.fp8 != "off":  # before checkpointing and compile wrap the blocks (parallel/fp8.py)
            check_fp8_support(device)
            apply_fp8(model, cfg.train.fp8)
        # MoD aux gradients: scaled like the LM loss (DeepSpeed divides it by grad_accum; a CP rank's
        # share of a sequence's mean is 1/cp of its local mean)
        set_aux_loss_scale(model, 1.0 / (cfg.train.grad_accum * dims.cp))
        mark_tied_copy(model)  # pp > 1: the last stage's copy of a tied embedding stays out of the optimizer
        ckpt_dir = os.path.join(cfg.train.run_dir, "checkpoints")
        resume_tag = _agreed_tag(ckpt_dir, cfg, dims) if cfg.checkpoint.resume else None
        if resume_tag is None and cfg.checkpoint.load:
            _load_initial_weights(model, cfg, dims)  # before the engine: its optimizer starts from them
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        loss_fn = build_loss_fn(cfg, dims, model)
        if cfg.train.compile:
            apply_compile(model)
            if not cfg.train.loss_chunk_tokens:  # the chunked loss compiles its chunks itself (loss.py)
                loss_fn = compile_loss(loss_fn, dims.tp)
        engine = build_engine(cfg, model, dims, device)
        train_data, valid_data = build_train_valid(cfg, dims.dp)
        metrics = MetricsLogger(cfg.train.run_dir, enabled=dims.rank == 0, tensorboard=cfg.logging.tensorboard,
                                progress=cfg.train.progress, total_steps=cfg.train.steps)
        stop = stop or StopController(cfg.train.exit_after_minutes or None).install()
        pipeline = None
        if dims.pp > 1:
            pipeline = PipelineSchedule(cfg, dims, model, engine, loss_fn, device)
            pipeline.sync_tied_weights()  # the last stage's copy starts as stage 0's matrix
        t = cfg.train
        guard = StepGuard(device, t.max_consecutive_skips, t.spike_sigma, t.spike_window)
        if pipeline is not None:
            pipeline.guard_loss = guard.guard
        trainer = cls(cfg, dims, device, model, loss_fn, engine, train_data, valid_data,
                      ckpt.TrainState(), metrics, stop, pipeline, guard)
        if resume_tag is not None:
            trainer.resume(resume_tag)
        return trainer

    # ---- checkpoints ----------------------------------------------------------------------------
    def resume(self, tag: str | None = None) -> None:
        """Continue from ``tag`` (default: the newest complete checkpoint of this run that passes its
        manifest's check, if any; checkpoint.choose_resume_tag)."""
        tag = tag or _agreed_tag(self.ckpt_dir, self.cfg, self.dims)
        if tag is None:
            return
        meta = ckpt.read_meta(self.ckpt_dir, tag)
        if meta.get("weights_only"):
            raise ConfigError(f"{self.ckpt_dir}/{tag} holds weights only (no optimizer state), it cannot be "
                               f"resumed: start a new run from it with --checkpoint.load {self.cfg.train.run_dir} "
                               f"--train.run_dir NEW_DIR")
        _check_architecture(f"checkpoint {self.ckpt_dir}/{tag}", meta["config"]["model"], self.cfg,
                            "Use the checkpoint's model flags, or a new --train.run_dir")
        self.state, ours = ckpt.load(self.engine, self.ckpt_dir, tag, grid=self.dims.sizes(), stage=self._stage)
        if "guard" in ours:
            self.guard.load_state_dict(ours["guard"])
        if self.pipeline is not None:
            self.pipeline.sync_tied_weights()
        if self.dims.rank == 0:
            print(f"resumed from {self.ckpt_dir}/{tag} at step {self.state.step}", flush=True)

    @property
    def _stage(self) -> int | None:
        """This rank's pipeline stage, or None at pp=1 (checkpoint layout, checkpoint.py)."""
        return self.dims.coords()["pp"] if self.dims.pp > 1 else None

    def save(self, must: bool = False) -> str | None:
        """Save a checkpoint. A failed save (CheckpointSaveError) is reported and training goes
        on, unless ``must`` (the last save before exiting) or --checkpoint.on_save_error stop."""
        try:
            return ckpt.save(self.engine, self.ckpt_dir, self.state, self.cfg.to_dict(), self.cfg.checkpoint.keep_last,
                             stage=self._stage, rank_state={"guard": self.guard.state_dict()},
                             group=self.dims.group("control"))
        except ckpt.CheckpointSaveError as e:
            if must or self.cfg.checkpoint.on_save_error == "stop":
                raise
            if self.dims.rank == 0:
                print(f"warning: {e}; training goes on (--checkpoint.on_save_error continue)", flush=True)
            return None

    # ---- steps ----------------------------------------------------------------------------------
    def _shard(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, S+1) -> tokens, targets (B, S/cp) and their positions (None at cp = 1)."""
        return shard_batch(batch.to(self.device, non_blocking=True), self.dims.cp, self.dims.coords()["cp"])

    def forward_backward_step(self, batch: torch.Tensor) -> torch.Tensor:
        tokens, targets, positions = self._shard(batch)  # (B, S/cp) each
        loss = self.loss_fn(self.engine(tokens, positions), targets)
        self.engine.backward(self.guard.guard(loss))  # a non-finite loss poisons the gradients: the step is skipped
        self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        return loss.detach()

    def train_step(self, batches: Iterator[torch.Tensor]) -> torch.Tensor:
        """One optimizer step. Returns the mean loss over the micro-batches (under PP: on the last
        stage; 0 elsewhere, and ``_dp_mean`` sums over the pipeline)."""
        if self.pipeline is not None:
            loss = self.pipeline.train_step(batches)
        else:
            loss = torch.stack([self.forward_backward_step(next(batches)) for _ in range(self.cfg.train.grad_accum)]).mean()
        self.guard.after_step(self.engine.get_global_grad_norm())  # counts a skipped step, on the device
        t = self.cfg.train
        self.state.step += 1
        self.state.consumed_samples += t.micro_batch_size * t.grad_accum * self.dims.dp
        self.state.flops += self.step_flops
        return loss

    def _dp_mean(self, value: torch.Tensor) -> float:
        """Mean over data-parallel replicas of a value the last pipeline stage holds (the other
        stages hold 0, so a sum over the pipeline group moves it to every rank). Under CP each rank
        holds its share of the sequence's loss (context.cp_loss): summed over the CP group too."""
        value = value.detach().float().clone()
        dist.all_reduce(value, group=self.dims.group("dp_cp"))
        if self.dims.pp > 1:
            dist.all_reduce(value, group=self.dims.group("pp"))
        return value.item() / self.dims.dp

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """val_loss with training-style routing; for MoD models also val_loss_causal (the causal
        routing generation uses), predictor accuracy and flip rates (rank 0's, over routed layers)."""
        out = {"val_loss": self._eval_loss()}
        if self.cfg.train.trailing_loss_tokens:
            out["val_loss_trailing"] = self._eval_loss(last=self.cfg.train.trailing_loss_tokens)
        # Every rank must take the same branch (evaluation is collective), but a pipeline stage
        # may hold no routed block: decide over all ranks.
        # Not under CP: causal routing's per-token decisions give the CP ranks unequal token counts,
        # which the CP attention's static shapes do not take; evaluate such a checkpoint at cp 1.
        causal = torch.tensor(float(has_causal_routing(self.model) and self.dims.cp == 1))
        dist.all_reduce(causal, op=dist.ReduceOp.MAX, group=self.dims.group("control"))
        if causal.item():
            out.update(evaluate_causal_routing(self.model, self._eval_loss))
        return _over_ranks(out) if self.dims.pp > 1 else out  # predictor statistics live on their stages

    @torch.no_grad()
    def _eval_loss(self, last: int = 0) -> float:
        """Mean validation loss; ``last`` > 0: over the last ``last`` positions of each sequence
        only, in a pass of its own (config.validate refuses it under PP)."""
        self.engine.eval()
        t = self.cfg.train
        batches = micro_batches(self.valid_data, t.micro_batch_size, self.dims.coords()["dp"], self.dims.dp, 0)
        total = torch.zeros((), device=self.device)
        for _ in range(t.eval_steps):
            batch = next(batches).to(self.device)
            if self.pipeline is not None:
                total += self.pipeline.eval_loss(batch)
            else:
                tokens, targets, positions = self._shard(batch)
                out = self.engine(tokens, positions)
                if last:  # the last positions of each sequence (validation refuses it under CP and PP)
                    out, targets = out[:, -last:], targets[:, -last:]
                total += self.loss_fn(out, targets)
        self.engine.train()
        return self._dp_mean(total / t.eval_steps)

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        batches = micro_batches(self.train_data, t.micro_batch_size, self.dims.coords()["dp"], self.dims.dp,
                                self.state.consumed_samples, cfg.model.vocab_size)
        dtype = resolve_dtype(cfg, self.device)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        # MFU against the bf16 peak, FP8 runs included (so runs compare); FP8 runs also against the FP8 peak
        peaks = {"mfu": peak_flops(name, dtype)}
        if t.fp8 != "off":
            peaks["mfu_fp8_peak"] = peak_flops(name, "fp8")
        tokens_per_step = t.micro_batch_size * t.grad_accum * self.dims.dp * t.seq_len
        last: dict[str, float] = {}
        if self.state.step == 0 and t.eval_interval > 0:
            last.update(self.evaluate())
            self.metrics.log(0, {**last, "val_ppl": _ppl(last["val_loss"])}, "valid")
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.state.step < t.steps:
                loss = self.train_step(batches)
                window_steps += 1
                step = self.state.step
                self.metrics.advance(1)
                if step % t.log_interval == 0 or step == t.steps:
                    last["loss"] = self._dp_mean(loss)  # syncs: only at log intervals
                    self.guard.check(step)  # too many skipped steps in a row: TooManySkips, no save
                    elapsed = time.perf_counter() - window_start
                    self._log_train(step, last["loss"], elapsed / window_steps, tokens_per_step, peaks)
                    window_start, window_steps = time.perf_counter(), 0
                if t.eval_interval > 0 and step % t.eval_interval == 0 and step != t.steps:
                    val = self.evaluate()
                    last.update(val)
                    self.metrics.log(step, {**val, "val_ppl": _ppl(val["val_loss"])}, "valid")
                    window_start, window_steps = time.perf_counter(), 0  # evaluation is not step time
                if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step != t.steps:
                    self.save()
                if step == t.exit_at_step:
                    self.save(must=True)
                    return last
                if self.stop.should_stop(self.dims.group("control")):
                    self.save(must=True)
                    if self.dims.rank == 0:
                        print(f"stopping at step {step}: {self.stop.reason}; checkpoint saved", flush=True)
                        if self.stop.wants_requeue:  # SIGUSR1 (time limit ahead), not a plain scancel
                            requeue_slurm_job()
                    return last
            val = self.evaluate()
            last.update(val)
            self.metrics.log(self.state.step, {**val, "val_ppl": _ppl(val["val_loss"])}, "valid")
            saved = f"checkpoint {self.ckpt_dir}/{self.save(must=True)}" if cfg.checkpoint.save_at_end else "no checkpoint"
            if self.dims.rank == 0:
                print(f"done: {self.state.step} steps; {saved}; TensorBoard: "
                      f"tensorboard --logdir {os.path.join(t.run_dir, 'tensorboard')}", flush=True)
            return last
        finally:
            self.stop.uninstall()
            self.metrics.close()

    def _log_train(self, step: int, loss: float, step_time: float, tokens_per_step: int,
                   peaks: dict[str, float | None]) -> None:
        flops_per_rank = self.step_flops / self.dims.world_size  # every rank does an equal share
        tflops = flops_per_rank / step_time / 1e12  # per device
        values = {"loss": loss, "lr": self.engine.get_lr()[0], "grad_norm": _float(self.engine.get_global_grad_norm()),
                  "step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time, "tflops_per_device": tflops,
                  "skipped_steps": float(self.guard.skipped),
                  "flops": self.state.flops, "forward_flops_per_seq": float(forward_flops_per_sequence(self.cfg))}
        module_values: dict[str, float] = {}
        for name, module in self.model.named_modules():
            if hasattr(module, "log_metrics"):  # seam for MoD routers, MoBA gates, ...
                module_values.update({f"{name}/{k}": v for k, v in module.log_metrics().items()})
        values.update(_over_ranks(module_values))
        values.update({key: tflops * 1e12 / peak for key, peak in peaks.items() if peak})
        if self.device.type == "cuda":
            values["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            values["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.metrics.log(step, values)


def _agreed_tag(ckpt_dir: str, cfg: Config, dims: ParallelDims) -> str | None:
    """The newest complete tag whose files match their manifest (falling back to an older one as
    --checkpoint.verify / --checkpoint.fallback say), the same on every rank."""
    c = cfg.checkpoint
    return ckpt.choose_resume_tag(ckpt_dir, c.verify, c.fallback, dims.group("control"))


def _check_architecture(what: str, saved: dict[str, Any], cfg: Config, fix: str) -> None:
    """Refuse weights of another shape, naming every --model flag that differs. The flavour is
    only a preset of the other fields, so it is not compared."""
    now = cfg.to_dict()["model"]
    diff = {k: (saved.get(k), v) for k, v in now.items() if k != "flavour" and saved.get(k) != v}
    if diff:
        flags = ", ".join(f"--model.{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diff.items())
        raise ConfigError(f"{what} has another architecture: {flags}. {fix}")


def _load_initial_weights(model: GPT, cfg: Config, dims: ParallelDims) -> None:
    """--checkpoint.load: weights from any complete checkpoint, any grid (checkpoint.py)."""
    try:
        ckpt_dir, tag = ckpt.resolve_checkpoint(cfg.checkpoint.load)
    except FileNotFoundError as e:
        raise ConfigError(f"--checkpoint.load: {e}") from None
    meta = ckpt.read_meta(ckpt_dir, tag)
    _check_architecture(f"--checkpoint.load {ckpt_dir}/{tag}", meta["config"]["model"], cfg,
                        "Pass the checkpoint's model flags (tools/convert_from_hf.py writes them to OUTPUT/config.yaml)")
    with torch.device("meta"):
        full_names = set(GPT(cfg).state_dict())
    ckpt.load_initial_weights(model, ckpt_dir, tag, full_names)
    if dims.rank == 0:
        print(f"initial weights from {ckpt_dir}/{tag} (fresh optimizer, step 0)", flush=True)


def _over_ranks(local: dict[str, float]) -> dict[str, float]:
    """Module metrics averaged over the ranks that report them (pipeline stages hold different
    modules); per-rank counts (keys ending in "selected_tokens", and "cp_work", a CP rank's
    attention work) also as their max over ranks, so max/mean shows the imbalance. A collective at log intervals only."""
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    out: dict[str, float] = {}
    for key in sorted({k for g in gathered for k in g}):
        vals = [g[key] for g in gathered if key in g]
        out[key] = sum(vals) / len(vals)
        if key.endswith(("selected_tokens", "cp_work")):
            out[key + "_max"] = max(vals)
    return out


def _ppl(loss: float) -> float:
    return float(torch.tensor(loss).clamp(max=50).exp())


def _float(x: Any) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if hasattr(x, "item") else x)
