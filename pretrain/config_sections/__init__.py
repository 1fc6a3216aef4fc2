"""The sections of the run config: one dataclass per component, each checking its own values.

``pretrain/config.py`` assembles them into ``Config`` and loads YAML and overrides; import from there. Each
field's docstring (the string under it) is what ``pretrain config --describe`` prints. One module per group of
sections: `model`, `data` (with `data.aug`), `train`, and `run` (run, loss, dist, checkpoint, log, eval,
distill); `base` holds the error type and checks they share.
"""

from pretrain.config_sections.base import (
    NOT_SECRETS,
    PRECISIONS,
    SCHEDULES,
    SECRET_WORDS,
    STRATEGIES,
    ConfigError,
    close_matches,
)
from pretrain.config_sections.data import AugConfig, DataConfig
from pretrain.config_sections.model import ModelConfig
from pretrain.config_sections.run import (
    CheckpointConfig,
    DistConfig,
    DistillConfig,
    EvalConfig,
    EvalTaskConfig,
    LogConfig,
    LossConfig,
    RunConfig,
)
from pretrain.config_sections.train import DEEPSPEED_TIMM_OPTIMIZERS, TrainConfig, timm_optimizer_names

__all__ = [
    "DEEPSPEED_TIMM_OPTIMIZERS", "NOT_SECRETS", "PRECISIONS", "SCHEDULES", "SECRET_WORDS", "STRATEGIES",
    "AugConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DistConfig", "DistillConfig", "EvalConfig",
    "EvalTaskConfig", "LogConfig", "LossConfig", "ModelConfig", "RunConfig", "TrainConfig", "close_matches",
    "timm_optimizer_names",
]  # fmt: skip
