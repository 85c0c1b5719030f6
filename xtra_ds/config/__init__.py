"""Typed run configuration: ``load_config("ds_configs/tiny_cpu.yaml", ["optim.lr=3e-4"])``.

schema (the tree, documented) · parse (YAML + overrides) · validate · describe · derive (numbers
worked out once: batch plan, model sizes, steps) · deepspeed (DeepSpeed's dict from the tree).
"""

from .deepspeed import deepspeed_dict
from .derive import BatchPlan, RunPlan, batch_plan, derive, sizes_from_config
from .describe import describe
from .parse import config_to_dict, load_config, parse_overrides, save_config
from .schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ScheduleConfig,
    all_keys,
)

__all__ = [
    "Config", "ModelConfig", "ObjectiveConfig", "DataConfig", "OptimConfig", "ScheduleConfig",
    "DeepSpeedConfig", "LoggingConfig", "CheckpointConfig", "EvalConfig", "ConfigError",
    "load_config", "save_config", "config_to_dict", "parse_overrides", "describe", "all_keys",
    "BatchPlan", "RunPlan", "batch_plan", "derive", "sizes_from_config", "deepspeed_dict",
]
