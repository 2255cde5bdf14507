"""Typed configuration: one dataclass per section, loaded from YAML, overridden by dotted flags.

    megamod-train --config examples/configs/debug.yaml --model.n_layers 8 --parallel.tp 2

Every field carries its help text in ``metadata["help"]`` (shown by ``megamod-train --help``).
Validation happens here, before any process group exists, and every message names the flag to
change. Nothing in this module touches torch.distributed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
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


# ---------------------------------------------------------------------------------------------
# Loading: YAML dict + dotted overrides -> Config
# ---------------------------------------------------------------------------------------------

def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in dataclasses.fields(Config)}


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(flag: str, tp: Any, value: Any) -> Any:
    """Turn a YAML value or command-line string into the field's type, or say what is wrong."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"--{flag} {value!r} is not allowed; choose one of {list(choices)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(flag, item, v) for v in value]
    if isinstance(value, (dict, list, tuple, set)):
        raise ConfigError(f"--{flag} expects a single value, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{flag} expects true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"--{flag} expects a number, got {value!r}")
        try:
            out = tp(value) if tp is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{flag} expects {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"--{flag} expects an integer, got {value!r}")
        if tp is float and not math.isfinite(out):
            raise ConfigError(f"--{flag} expects a finite number, got {value!r}")
        return out
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {flag}")


def parse_overrides(argv: list[str]) -> dict[str, dict[str, Any]]:
    """``['--model.n_layers', '4', '--data.paths', '0.7', 'a']`` -> ``{'model': {'n_layers': '4'}, ...}``.

    Values stay strings here; a flag followed by several values keeps them all (list fields).
    """
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field value")
        key, _, inline = arg[2:].partition("=")
        section, _, name = key.partition(".")
        values: list[str] = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not (argv[i].startswith("--") and not is_number(argv[i])):
            values.append(argv[i])
            i += 1
        if not values:
            raise ConfigError(f"--{key} needs a value")
        out.setdefault(section, {})[name] = values[0] if len(values) == 1 else values
    return out


def is_number(s: str) -> bool:
    """Whether a command-line word is a number (a value such as -1, not a --flag; a blend weight)."""
    try:
        float(s)
        return True
    except ValueError:
        return False


def _merge(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def build_config(raw: dict[str, Any]) -> Config:
    """Nested dict (YAML + overrides merged) -> validated-type Config. Unknown keys are errors."""
    sections = _sections()
    kwargs: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}{_suggest(section, list(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of field: value")
        cls = sections[section]
        types_ = _field_types(cls)
        fields: dict[str, Any] = {}
        for name, value in values.items():
            if name not in types_:
                raise ConfigError(f"unknown flag --{section}.{name}{_suggest(name, list(types_))}")
            fields[name] = _coerce(f"{section}.{name}", types_[name], value)
        if cls is ModelConfig:
            kwargs[section] = ModelConfig.from_flavour(fields.pop("flavour", "debug"), **fields)
        else:
            kwargs[section] = cls(**fields)
    return Config(**kwargs)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path:
        import yaml

        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: top level must be a mapping of sections")
        raw = {k: {} if v is None else v for k, v in raw.items()}  # a section with every field commented out
        bad = [k for k, v in raw.items() if not isinstance(v, dict)]
        if bad:
            raise ConfigError(f"--config {path}: section {bad[0]!r} must be a mapping of field: value")
    return build_config(_merge(raw, parse_overrides(overrides or [])))


# ---------------------------------------------------------------------------------------------
# Validation: impossible sizes, each with the flag to change
# ---------------------------------------------------------------------------------------------

def resolve_dp(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    model_parallel = p.tp * p.cp * p.pp
    if p.dp == -1:
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tp·cp·pp = {p.tp}·{p.cp}·{p.pp} = {model_parallel}; "
                f"change --parallel.tp/--parallel.cp/--parallel.pp or the number of processes")
        return world_size // model_parallel
    if p.dp * model_parallel != world_size:
        raise ConfigError(
            f"world size {world_size} != tp·cp·dp·pp = {p.tp}·{p.cp}·{p.dp}·{p.pp} = {p.dp * model_parallel}; "
            f"set --parallel.dp {world_size // model_parallel if world_size % model_parallel == 0 else -1} "
            f"or launch {p.dp * model_parallel} processes")
    return p.dp


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise ConfigError for the first impossible combination. Pure arithmetic, no processes."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name in ("tp", "cp", "pp"):
        if getattr(p, name) < 1:
            raise ConfigError(f"--parallel.{name} must be >= 1")
    if p.dp == 0 or p.dp < -1:
        raise ConfigError("--parallel.dp must be >= 1, or -1 to infer it from the world size")
    resolve_dp(cfg, world_size)
    if m.d_model % m.n_heads:
        raise ConfigError(f"--model.d_model {m.d_model} is not divisible by --model.n_heads {m.n_heads}")
    if m.head_dim % 2:
        raise ConfigError(f"head dim d_model/n_heads = {m.head_dim} must be even for RoPE; change --model.n_heads")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"--model.n_heads {m.n_heads} is not divisible by --model.n_kv_heads {m.n_kv_heads}")
    if m.n_heads % p.tp or m.n_kv_heads % p.tp:
        raise ConfigError(
            f"heads ({m.n_heads} query, {m.n_kv_heads} kv) are not divisible by --parallel.tp {p.tp}; "
            f"choose a tp that divides both")
    if m.ffn_hidden % p.tp:
        raise ConfigError(f"--model.ffn_hidden {m.ffn_hidden} is not divisible by --parallel.tp {p.tp}")
    if m.vocab_size % p.tp:
        # Refused rather than padded (Megatron pads): padding would make the embedding's shape
        # depend on tp, so checkpoints and exported weights would too.
        up = -(-m.vocab_size // p.tp) * p.tp
        raise ConfigError(f"--model.vocab_size {m.vocab_size} is not divisible by --parallel.tp {p.tp} (the "
                          f"vocabulary is split across TP ranks); set --model.vocab_size {up} (rows past the "
                          f"tokenizer's ids are never used) or choose another tp")
    if m.n_layers < p.pp:
        raise ConfigError(f"--model.n_layers {m.n_layers} is fewer than --parallel.pp {p.pp} stages")
    if p.pp_layers and (len(p.pp_layers) != p.pp or min(p.pp_layers) < 1 or sum(p.pp_layers) != m.n_layers):
        raise ConfigError(f"--parallel.pp_layers {p.pp_layers} must give {p.pp} stage sizes (one per --parallel.pp "
                          f"stage), each >= 1, summing to --model.n_layers {m.n_layers}; or leave it empty to "
                          f"split by estimated FLOPs")
    if p.pp > 1 and cfg.optim.zero_stage == 3:
        raise ConfigError("--optim.zero_stage 3 with --parallel.pp > 1 is not supported (ZeRO-3 would all-gather a "
                          "stage's weights for every micro-batch, and it is untested here); use --optim.zero_stage 2 "
                          "(or 1), which works with pipeline parallelism")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"--train.seq_len {t.seq_len} exceeds --model.max_seq_len {m.max_seq_len}")
    if p.cp > 1 and t.seq_len % (2 * p.cp):
        raise ConfigError(f"--train.seq_len {t.seq_len} must be divisible by 2·cp = {2 * p.cp} (load-balanced chunks)")
    if p.sequence_parallel and t.seq_len // p.cp % p.tp:
        raise ConfigError(f"with --parallel.sequence_parallel, seq_len/cp = {t.seq_len // p.cp} must be divisible "
                          f"by --parallel.tp {p.tp}")
    if m.attention == "moba":
        if cfg.moba.chunk_size < 1 or cfg.moba.topk < 1:
            raise ConfigError("--moba.chunk_size and --moba.topk must be >= 1")
        if p.cp > 1 and (t.seq_len // (2 * p.cp)) % cfg.moba.chunk_size:
            raise ConfigError(f"CP chunk seq_len/(2·cp) = {t.seq_len // (2 * p.cp)} must be a multiple of "
                              f"--moba.chunk_size {cfg.moba.chunk_size}")
    if cfg.mod.enabled:
        if not 0.0 < cfg.mod.capacity <= 1.0:
            raise ConfigError(f"--mod.capacity {cfg.mod.capacity} must be in (0, 1]")
        if cfg.mod.every < 1:
            raise ConfigError("--mod.every must be >= 1")
        bad = [i for i in cfg.mod.layers if not 0 <= i < m.n_layers]
        if bad:
            raise ConfigError(f"--mod.layers {bad} outside 0..{m.n_layers - 1}")
    if cfg.optim.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--optim.zero_stage {cfg.optim.zero_stage} must be 0, 1, 2 or 3")
    if t.bf16_mode == "master_fused" and (cfg.optim.zero_stage != 0 or world_size != 1):
        # Its optimizer holds every master weight and gradient itself: nothing is partitioned,
        # reduced or shared between ranks.
        raise ConfigError(f"--train.bf16_mode master_fused runs on one rank at --optim.zero_stage 0 (this run: "
                          f"{world_size} ranks, ZeRO-{cfg.optim.zero_stage}); use --train.bf16_mode master_weights "
                          f"(ZeRO >= 1) or autocast, or leave it at auto")
    for name in ("steps", "seq_len", "micro_batch_size", "grad_accum", "log_interval", "eval_steps", "spike_window"):
        if getattr(t, name) < 1:
            raise ConfigError(f"--train.{name} must be >= 1")
    for name in ("eval_interval", "exit_at_step", "exit_after_minutes", "max_consecutive_skips", "spike_sigma"):
        if getattr(t, name) < 0:
            raise ConfigError(f"--train.{name} must be >= 0")
    if t.collective_timeout_s <= 0:
        raise ConfigError(f"--train.collective_timeout_s {t.collective_timeout_s} must be positive (seconds)")
    if cfg.checkpoint.interval < 0 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("--checkpoint.interval must be >= 0 and --checkpoint.keep_last >= 1")
    if not cfg.data.paths and not cfg.data.synthetic:
        raise ConfigError("no training data: set --data.paths PREFIX (see tools/preprocess_data.py) "
                          "or --data.synthetic true")


def help_text() -> str:
    lines = ["Config flags (--section.field value):"]
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  --{section}.{f.name:<26} {f.metadata.get('help', '')} [{default}]")
    return "\n".join(lines)

