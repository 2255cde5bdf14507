"""Validation: impossible sizes and combinations, each refused with the flag to change. Pure
arithmetic on a ``Config`` and a world size, before any process group exists."""

from __future__ import annotations

import math
import os

from megamod.config.sections import Config, ConfigError

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
        raise ConfigError(f"--train.seq_len {t.seq_len} must be divisible by 2·cp = {2 * p.cp} (each sequence is cut "
                          f"into 2·cp load-balanced chunks); change --train.seq_len or --parallel.cp")
    if p.sequence_parallel and t.seq_len // p.cp % p.tp:
        raise ConfigError(f"with --parallel.sequence_parallel, seq_len/cp = {t.seq_len // p.cp} must be divisible "
                          f"by --parallel.tp {p.tp}")
    if m.attention == "moba":
        if cfg.moba.chunk_size < 1 or cfg.moba.topk < 1:
            raise ConfigError("--moba.chunk_size and --moba.topk must be >= 1")
        if p.cp > 1 and t.seq_len % (2 * p.cp * cfg.moba.chunk_size):
            raise ConfigError(f"--train.seq_len {t.seq_len} must be divisible by 2·cp·moba.chunk_size = "
                              f"{2 * p.cp * cfg.moba.chunk_size} (CP chunks are whole MoBA blocks); change "
                              f"--train.seq_len, --parallel.cp or --moba.chunk_size")
    if cfg.mod.enabled:
        if not 0.0 < cfg.mod.capacity <= 1.0:
            raise ConfigError(f"--mod.capacity {cfg.mod.capacity} must be in (0, 1]")
        if cfg.mod.every < 1:
            raise ConfigError("--mod.every must be >= 1")
        bad = [i for i in cfg.mod.layers if not 0 <= i < m.n_layers]
        if bad:
            raise ConfigError(f"--mod.layers {bad} outside 0..{m.n_layers - 1}")
        _validate_mod_windows(cfg)
    if cfg.optim.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--optim.zero_stage {cfg.optim.zero_stage} must be 0, 1, 2 or 3")
    if t.bf16_mode == "master_fused" and (cfg.optim.zero_stage != 0 or world_size != 1):
        # Its optimizer holds every master weight and gradient itself: nothing is partitioned,
        # reduced or shared between ranks.
        raise ConfigError(f"--train.bf16_mode master_fused runs on one rank at --optim.zero_stage 0 (this run: "
                          f"{world_size} ranks, ZeRO-{cfg.optim.zero_stage}); use --train.bf16_mode master_weights "
                          f"(ZeRO >= 1) or autocast, or leave it at auto")
    if t.loss_chunk_tokens < 0:
        raise ConfigError("--train.loss_chunk_tokens must be >= 0 (0: the full logits)")
    if t.loss_chunk_tokens and cfg.optim.zero_stage == 3:
        raise ConfigError("--train.loss_chunk_tokens uses the output weight outside its module, which ZeRO-3 "
                          "releases after the forward; use --optim.zero_stage 2 (or 1), or --train.loss_chunk_tokens 0")
    if t.fp8 != "off":
        _validate_fp8(cfg)
    if cfg.checkpoint.load and not os.path.isdir(cfg.checkpoint.load):
        raise ConfigError(f"--checkpoint.load {cfg.checkpoint.load}: no such directory (give a run directory, its "
                          f"checkpoints/ or a step_* directory)")
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
    if not 0 <= t.trailing_loss_tokens <= t.seq_len:
        raise ConfigError(f"--train.trailing_loss_tokens {t.trailing_loss_tokens} must be in 0..--train.seq_len "
                          f"{t.seq_len}")
    if t.trailing_loss_tokens and (p.pp > 1 or p.cp > 1):
        raise ConfigError("--train.trailing_loss_tokens is not supported with --parallel.pp > 1 or --parallel.cp > 1 "
                          "(the last positions of a sequence sit on one stage's or rank's share of it); set it to 0 "
                          "or use --parallel.pp 1 --parallel.cp 1")
    if not cfg.data.paths and not cfg.data.synthetic:
        raise ConfigError("no training data: set --data.paths PREFIX (see tools/preprocess_data.py) "
                          "or --data.synthetic true")


def _validate_mod_windows(cfg: Config) -> None:
    """Routing windows (mod.window) and Mixture-of-Depths under context parallelism."""
    mod, p, t = cfg.mod, cfg.parallel, cfg.train
    w = mod.window or t.seq_len
    if mod.window < 0 or t.seq_len % w:
        raise ConfigError(f"--mod.window {mod.window} must divide --train.seq_len {t.seq_len} (or be 0: the whole "
                          f"sequence)")
    if p.cp == 1:
        return
    chunk = t.seq_len // (2 * p.cp)
    if mod.cp_balance == "window" and (mod.window == 0 or chunk % mod.window):
        raise ConfigError(f"MoD under --parallel.cp {p.cp} routes per window: --mod.window must divide "
                          f"seq_len/(2·cp) = {chunk} (e.g. --mod.window {chunk}), or set --mod.cp_balance global")
    if mod.cp_balance == "global" and mod.window:
        raise ConfigError("--mod.cp_balance global takes the top k of the whole sequence: set --mod.window 0 "
                          "(or --mod.cp_balance window)")
    if mod.cp_balance == "global" and cfg.model.attention == "moba":
        raise ConfigError("--mod.cp_balance global spreads a sequence's routed tokens unevenly over the CP ranks, "
                          "so MoBA's blocks cannot follow them; use --mod.cp_balance window with MoBA")
    if mod.cp_balance == "window" and cfg.model.attention == "moba":
        routed_chunk = chunk // mod.window * max(1, int(mod.capacity * mod.window))
        if routed_chunk % cfg.moba.chunk_size:
            raise ConfigError(f"MoBA inside routed blocks under CP runs over the routed tokens, {routed_chunk} per CP "
                              f"chunk here: a multiple of --moba.chunk_size {cfg.moba.chunk_size} is needed; change "
                              f"--mod.window, --mod.capacity or --moba.chunk_size")




def _validate_fp8(cfg: Config) -> None:
    """FP8 training (train.fp8): what can be refused before a device exists. The GPU itself
    (compute capability 8.9+) and torchao are checked when the trainer starts
    (parallel/fp8.check_fp8_support)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if t.device == "cpu" or t.dtype == "fp32":
        raise ConfigError(f"--train.fp8 {t.fp8} runs on a GPU in bf16 (FP8 products inside a bf16 model); this run "
                          f"asks for --train.device {t.device} --train.dtype {t.dtype}: set --train.fp8 off, or "
                          f"--train.device cuda (or auto) and --train.dtype bf16 (or auto)")
    if cfg.optim.zero_stage == 3:
        raise ConfigError("--train.fp8 is supported with --optim.zero_stage 0, 1 or 2 (ZeRO-3's partitioned weights "
                          "are untested with torchao's float8 linears); use --optim.zero_stage 2")
    # FP8 GEMMs (cuBLASLt) need every dimension that is ever a product's inner or output size to
    # be a multiple of 16: weight features (per TP shard) and, in the weight gradient, the tokens.
    kv = m.n_kv_heads * m.head_dim
    features = {"--model.d_model": m.d_model, "--model.d_model (per TP rank)": m.d_model // p.tp,
                "--model.n_kv_heads·head_dim (per TP rank)": kv // p.tp,
                "--model.ffn_hidden (per TP rank)": m.ffn_hidden // p.tp}
    tokens = {"--train.micro_batch_size·seq_len/cp": t.micro_batch_size * t.seq_len // p.cp}
    if cfg.mod.enabled and p.cp == 1:
        w = cfg.mod.window or t.seq_len
        tokens["--train.micro_batch_size·(tokens a MoD block routes)"] = (
            t.micro_batch_size * (t.seq_len // w) * max(1, math.floor(cfg.mod.capacity * w)))
    bad = {k: v for k, v in {**features, **tokens}.items() if v % 16}
    if bad:
        what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise ConfigError(f"--train.fp8: FP8 matrix products need sizes that are multiples of 16, and {what} is not; "
                          f"change those sizes or set --train.fp8 off")
