"""DistributedDataParallel: replicated weights, gradients all-reduced (averaged) across ranks."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from pretrain.config import ConfigError
from pretrain.parallel.base import Strategy

log = logging.getLogger("pretrain")


def apply_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers turned into SyncBatchNorm (statistics over every rank's batch; open_clip's
    `--use-bn-sync`). Parameter and buffer names stay, so checkpoints load into the plain model."""
    count = sum(isinstance(m, _BatchNorm) for m in model.modules())
    if count == 0:
        log.info("dist.sync_bn: the model has no BatchNorm layer; nothing to sync")
        return model
    if device.type == "cpu":  # DDP refuses SyncBatchNorm in a CPU module; say so in the key's words
        raise ConfigError(
            f"dist.sync_bn: torch's DDP takes SyncBatchNorm on GPUs only, this run is on {device}"
        )
    log.info("dist.sync_bn: %d BatchNorm layers synced across ranks", count)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        model = self.prepare(model.to(device))
        if self.cfg.sync_bn:
            model = apply_sync_bn(model, device)
        device_ids = [device.index] if device.type == "cuda" else None
        # Every rank starts from rank 0's weights (DDP broadcasts them at construction).
        return DistributedDataParallel(model, device_ids=device_ids, static_graph=self.cfg.static_graph)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DistributedDataParallel) else module

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()
