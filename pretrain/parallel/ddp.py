"""DistributedDataParallel: replicated weights, gradients all-reduced (averaged) across ranks."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.parallel.base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        model = self.prepare(model.to(device))
        device_ids = [device.index] if device.type == "cuda" else None
        # Every rank starts from rank 0's weights (DDP broadcasts them at construction).
        return DistributedDataParallel(model, device_ids=device_ids)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DistributedDataParallel) else module

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()
