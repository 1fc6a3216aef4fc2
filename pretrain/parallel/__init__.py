"""Parallel strategies behind one interface (`Strategy`), chosen by `dist.strategy`."""

from __future__ import annotations

from pretrain.config import DistConfig
from pretrain.distributed import DistInfo
from pretrain.parallel.base import Strategy


def build_strategy(cfg: DistConfig, info: DistInfo) -> Strategy:
    """The strategy for this run; a single process needs no wrapper at all."""
    if cfg.strategy != "ddp":
        raise NotImplementedError(f"dist.strategy={cfg.strategy} is not available yet (only ddp)")
    if not info.distributed:
        return Strategy()
    from pretrain.parallel.ddp import DDPStrategy

    return DDPStrategy()
