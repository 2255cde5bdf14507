"""The typed sections of the configuration: one dataclass per section, every field with its help
text in ``metadata["help"]``, and the named model flavours."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# Named model flavours (torchtitan's ``llama3_configs`` idea). Each entry lists only what differs
# from ``ModelConfig``'s defaults; ``python -m megamod.model.flavours`` prints exact parameter counts.
FLAVOURS: dict[str, dict[str, object]] = {
    # Tiny: trains in minutes on a 2-core CPU (the demo and most tests).
    "debug": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=384, vocab_size=4096),
    # GPT-3 table shapes, Llama-style blocks (SwiGLU hidden ≈ 8/3·d rounded to 256).
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_hidden=2048, vocab_size=32000),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_hidden=2816, vocab_size=32000),
    "760m": dict(d_model=1536, n_layers=24, n_heads=16, n_kv_heads=16, ffn_hidden=4096, vocab_size=32000),
    # TinyLlama-1.1B-like shape with full MHA: ~1.26B parameters untied (the throughput issue's model).
    "1b": dict(d_model=2048, n_layers=22, n_heads=16, n_kv_heads=16, ffn_hidden=5632, vocab_size=32000),
    # ~2.07B untied: 24 layers of d=2560, head dim 128.
    "2b": dict(d_model=2560, n_layers=24, n_heads=20, n_kv_heads=20, ffn_hidden=6912, vocab_size=32000),
}


class ConfigError(ValueError):
    """A configuration the user must change; the message names the flag."""


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    flavour: str = _f("debug", f"named architecture preset, one of {sorted(FLAVOURS)}; other model.* flags override it")
    vocab_size: int = _f(4096, "vocabulary size (the tokenizer's; must be divisible by parallel.tp)")
    d_model: int = _f(128, "hidden size")
    n_layers: int = _f(4, "number of transformer blocks")
    n_heads: int = _f(4, "attention query heads")
    n_kv_heads: int = _f(4, "key/value heads (fewer than n_heads gives grouped-query attention)")
    ffn_hidden: int = _f(384, "SwiGLU hidden size")
    max_seq_len: int = _f(4096, "longest sequence RoPE tables are built for")
    rope_theta: float = _f(10000.0, "RoPE base")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = _f(False, "share the input embedding and output projection weights")
    init_std: float = _f(0.02, "std of the normal init; residual output projections use init_std/sqrt(2·n_layers)")
    attention: Literal["sdpa", "moba"] = _f("sdpa", "inner attention: dense causal SDPA or MoBA block-sparse")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_flavour(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in FLAVOURS:
            raise ConfigError(f"--model.flavour {name!r} is unknown; choose one of {sorted(FLAVOURS)}")
        return cls(**{**FLAVOURS[name], "flavour": name, **overrides})


@dataclass
class ParallelConfig:
    tp: int = _f(1, "tensor-parallel degree (ranks that split each layer's matrices)")
    cp: int = _f(1, "context-parallel degree (ranks that split each sequence)")
    pp: int = _f(1, "pipeline-parallel degree (stages of layers)")
    pp_layers: list[int] = _f([], "blocks per pipeline stage, e.g. [6, 6, 5, 5]; empty: split by estimated FLOPs")
    dp: int = _f(-1, "data-parallel degree; -1 takes world_size / (tp·cp·pp)")
    sequence_parallel: bool = _f(False, "shard norms/residuals along the sequence inside TP groups")


@dataclass
class ModConfig:
    enabled: bool = _f(False, "Mixture-of-Depths routing in every mod.every-th block")
    capacity: float = _f(0.125, "fraction of each sequence's tokens a routed block processes")
    every: int = _f(2, "route blocks every-1, 2·every-1, …; block 0 is always full")
    layers: list[int] = _f([], "explicit routed block indices (overrides mod.every when non-empty)")
    gate: Literal["identity", "sigmoid"] = _f("identity", "multiplier g(r) applied to the block output")
    routing: Literal["learned", "random"] = _f("learned", "learned router, or the paper's random-routing control")
    aux_loss_weight: float = _f(0.01, "weight of the router BCE loss (top-k membership targets)")
    predictor: bool = _f(True, "train the stop-gradient causal predictor used for sampling")
    predictor_hidden: int = _f(0, "predictor MLP hidden size (0: d_model // 8)")
    window: int = _f(0, "route the top k = max(1, floor(capacity·window)) of every window of this many "
                        "consecutive tokens (0: the whole sequence); the same window routes the same at every cp")
    cp_balance: Literal["window", "global"] = _f(
        "window", "under context parallelism: 'window' (mod.window must divide seq_len/(2·cp): every rank "
        "routes its own windows, no communication) or 'global' (exact per-sequence top-k over all-gathered "
        "router logits, each rank's routed tokens padded to a fixed cap; mod.window 0)")
    cp_slack: float = _f(0.25, "global mode: each CP rank processes at most ceil(k/cp·(1 + cp_slack)) tokens; "
                              "selected tokens beyond that ride the residual (counted as overflow)")


@dataclass
class MobaConfig:
    chunk_size: int = _f(64, "MoBA block size in tokens")
    topk: int = _f(3, "blocks each query attends to, its own block included")
    full_attention_layers: list[int] = _f([], "block indices that keep dense attention (negative counts from the end)")


@dataclass
class OptimConfig:
    lr: float = _f(3e-3, "peak learning rate")
    min_lr: float = _f(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(20, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "global gradient-norm clip (0 disables)")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage 0, 1, 2 or 3")


@dataclass
class DataConfig:
    paths: list[str] = _f([], "dataset prefixes, optionally weighted: 'a' or '0.7 a 0.3 b' (Megatron's --data-path)")
    split: str = _f("98,2,0", "train,valid,test document split weights")
    tokenizer_model: str = _f("", "sentencepiece model (needed for generation)")
    cache_dir: str = _f("", "where sample indices are cached ('' = next to the data)")
    synthetic: bool = _f(False, "random tokens instead of data.paths (tests and benchmarks)")


@dataclass
class TrainConfig:
    run_dir: str = _f("runs/default", "checkpoints, TensorBoard events and logs go here")
    steps: int = _f(100, "optimizer steps to train")
    seq_len: int = _f(256, "tokens per sample")
    micro_batch_size: int = _f(8, "samples per rank per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seed: int = _f(1234, "seed for init, data order and dropout")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "cuda when available, else cpu")
    dtype: Literal["auto", "fp32", "bf16"] = _f("auto", "bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = _f(False, "recompute each block in backward to save memory")
    compile: bool = _f(False, "torch.compile each block")
    loss_chunk_tokens: int = _f(0, "compute the output projection and cross-entropy this many tokens at a time, "
                                   "recomputed in backward, so the full logits never exist (long sequences; 0: off)")
    fp8: Literal["off", "tensorwise", "rowwise"] = _f(
        "off", "FP8 matmuls in the block linears (attention wq/wk/wv/wo, feed-forward w1/w2/w3) through torchao's "
        "float8 training, scaled 'tensorwise' (one scale a tensor: the faster) or 'rowwise' (one a row: the more "
        "accurate); the output projection, MoD router and predictor, embedding and norms stay bf16, and "
        "checkpoints keep bf16/fp32 weights. Needs a GPU of compute capability 8.9+ (Ada, Hopper), torchao "
        "(pip install 'megamod[fp8]'), bf16 and optim.zero_stage 0-2; use with train.compile for speed")
    bf16_mode: Literal["auto", "master_fused", "master_weights", "autocast"] = _f(
        "auto", "how bf16 training runs (train.dtype bf16): 'master_fused' keeps bf16 weights and megamod's "
        "MasterAdamW holds the fp32 master weights and moments, stepped (and clipped) in one fused kernel (one "
        "rank at optim.zero_stage 0: the fastest single-GPU step); 'master_weights' keeps bf16 weights and gradients "
        "with fp32 master weights inside DeepSpeed's ZeRO optimizer; 'autocast' keeps fp32 weights and runs "
        "matmuls in bf16 under torch.autocast (DeepSpeed's torch_autocast mode; at optim.zero_stage 0 a fused AdamW "
        "clips in its own kernel); 'auto': master_fused on one rank at optim.zero_stage 0, autocast on more ranks "
        "at zero_stage 0, else master_weights")
    eval_interval: int = _f(50, "evaluate every N steps (0: only at the end)")
    eval_steps: int = _f(10, "validation micro-batches per evaluation")
    trailing_loss_tokens: int = _f(0, "evaluation also logs val_loss_trailing, the loss on the last N tokens of "
                                      "each sequence (MoBA's long-context check; 0: off)")
    log_interval: int = _f(10, "console/TensorBoard logging interval in steps")
    exit_after_minutes: float = _f(0.0, "save and exit cleanly after this wall time (0: no limit)")
    exit_at_step: int = _f(0, "save and exit after this step, keeping the schedule of train.steps (0: off)")
    progress: Literal["auto", "on", "off"] = _f("auto", "console progress bar (auto: only on a terminal)")
    collective_timeout_s: float = _f(600.0, "a collective that waits longer than this for a peer fails, and a rank "
                                     "whose heartbeat stops for this long is declared failed: the survivors exit "
                                     "non-zero naming it (gloo and NCCL; torchrun --max-restarts or a Slurm requeue "
                                     "then resumes from the newest complete checkpoint). Work one rank does while "
                                     "the others wait must fit in it: a first-time sample index over a large corpus, "
                                     "a checkpoint converted for another grid (Megatron's default is 10 minutes too)")
    max_consecutive_skips: int = _f(5, "stop with an error after this many optimizer steps in a row were skipped "
                                    "for a non-finite loss or gradient (or a loss spike); 0: never stop")
    spike_sigma: float = _f(0.0, "also skip a step when a micro-batch loss exceeds mean + spike_sigma·std of that "
                            "rank's last train.spike_window micro-batch losses (0: off)")
    spike_window: int = _f(100, "micro-batch losses the loss-spike guard keeps (train.spike_sigma)")


@dataclass
class CheckpointConfig:
    interval: int = _f(0, "save every N steps (0: only at the end)")
    keep_last: int = _f(3, "complete checkpoints to keep")
    resume: bool = _f(True, "resume from the newest complete checkpoint in the run directory")
    save_at_end: bool = _f(True, "save when training ends (false: benchmarks whose weights are thrown away)")
    verify: bool = _f(True, "on resume, check every file of the checkpoint against the sizes and checksums its "
                      "manifest recorded")
    fallback: bool = _f(True, "when the newest complete checkpoint fails verification, resume from the previous one "
                        "(false: stop with an error naming the bad file)")
    on_save_error: Literal["continue", "stop"] = _f(
        "continue", "a save that fails (disk full, I/O error) leaves the previous checkpoint and `latest` as they were "
        "and is reported; then keep training ('continue', the next save retries) or exit non-zero ('stop'). A save "
        "at the end of training or at a stop request that fails always exits non-zero")
    load: str = _f("", "initial weights from this checkpoint (a run directory, its checkpoints/ or a step_* "
                       "directory; any grid, or tools/convert_from_hf.py's output) with a fresh optimizer and step 0; "
                       "ignored once this run has its own checkpoint to resume")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "write TensorBoard events under run_dir/tensorboard")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    mod: ModConfig = field(default_factory=ModConfig)
    moba: MobaConfig = field(default_factory=MobaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


