"""Parallel strategies behind one interface (`Strategy`), chosen by `dist.strategy`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pretrain.config import Config
from pretrain.parallel.base import Strategy
from pretrain.parallel.distributed import DistInfo


def build_strategy(cfg: Config, info: DistInfo) -> Strategy:
    """The strategy for this run, compiling transformer blocks when `train.compile` is set."""
    strategy = _strategy_for(cfg, info)
    strategy.compile_blocks = cfg.train.compile
    return strategy


def _strategy_for(cfg: Config, info: DistInfo) -> Strategy:
    """The strategy of `dist.strategy`. A single-process DDP run needs no wrapper; FSDP and DeepSpeed keep their
    own checkpoint formats even on one process (so a sharded run can resume on one device)."""
    dist_cfg, precision = cfg.dist, cfg.train.precision
    if dist_cfg.strategy == "fsdp":
        from pretrain.parallel.fsdp import FSDPStrategy

        return FSDPStrategy(dist_cfg, precision)
    if dist_cfg.strategy == "deepspeed":
        from pretrain.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(dist_cfg, precision, cfg.train)
    if not info.distributed:
        return Strategy(dist_cfg, precision)
    from pretrain.parallel.ddp import DDPStrategy

    return DDPStrategy(dist_cfg, precision)


def load_model_weights(folder: Path, model: nn.Module) -> None:
    """Load the trained weights of any strategy's checkpoint folder into a plain model, no process group."""
    if (folder / "model.safetensors").is_file():
        Strategy().load(folder, model, None)
        return
    from pretrain.parallel.fsdp import DCP_DIR, load_dcp_weights

    if (folder / DCP_DIR).is_dir():
        load_dcp_weights(folder, model)
        return
    from pretrain.parallel.deepspeed import DS_DIR, load_deepspeed_weights

    if (folder / DS_DIR).is_dir():
        load_deepspeed_weights(folder, model)
        return
    raise FileNotFoundError(f"{folder}: no model.safetensors, {DCP_DIR}/ or {DS_DIR}/ in this checkpoint")
