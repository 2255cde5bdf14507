"""Typed configuration: one dataclass per section, loaded from YAML, overridden by dotted flags.

    megamod-train --config examples/configs/debug.yaml --model.n_layers 8 --parallel.tp 2

Every field carries its help text in ``metadata["help"]`` (shown by ``megamod-train --help``).
Validation happens here, before any process group exists, and every message names the flag to
change. Nothing in this module touches torch.distributed.
"""

from megamod.config.loading import build_config, help_text, is_number, load_config, parse_overrides
from megamod.config.sections import (FLAVOURS, CheckpointConfig, Config, ConfigError, DataConfig, LoggingConfig,
                                     MobaConfig, ModConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig)
from megamod.config.validation import resolve_dp, validate

__all__ = ["FLAVOURS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig", "MobaConfig",
           "ModConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "TrainConfig", "build_config", "help_text",
           "is_number", "load_config", "parse_overrides", "resolve_dp", "validate"]
