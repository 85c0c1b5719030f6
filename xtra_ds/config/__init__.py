"""Typed run configuration: ``load_config("ds_configs/tiny_cpu.yaml", ["optim.lr=3e-4"])``."""

from .deepspeed import deepspeed_dict
from .loader import ConfigError, all_keys, batch_plan, describe, load_config, save_config
from .schema import (CheckpointConfig, Config, DataConfig, DeepSpeedConfig, EvalConfig, LoggingConfig,
                     ModelConfig, ObjectiveConfig, OptimConfig, ScheduleConfig)

__all__ = [
    "Config", "ModelConfig", "ObjectiveConfig", "DataConfig", "OptimConfig", "ScheduleConfig",
    "DeepSpeedConfig", "LoggingConfig", "CheckpointConfig", "EvalConfig", "ConfigError",
    "load_config", "save_config", "describe", "all_keys", "batch_plan", "deepspeed_dict",
]
