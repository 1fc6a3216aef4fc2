"""Run on 2 gloo ranks by test_open_clip_options.py: the DDP strategy with `dist.sync_bn` and
`dist.static_graph` wraps a model with BatchNorm (a ResNet image tower, config file argv[1]; refused on CPU,
where torch's DDP takes no SyncBatchNorm) and tiny-clip (no BatchNorm). Rank 0 writes what the wrapped models
hold, or the refusal, to argv[2] as JSON."""

from __future__ import annotations

import json
import logging
import sys

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pretrain.config import ConfigError, DistConfig, ModelConfig
from pretrain.models.build import build_model
from pretrain.parallel.ddp import DDPStrategy
from pretrain.parallel.distributed import detect, init_distributed, shutdown


def kinds(module: nn.Module) -> dict:
    """How many plain and synced BatchNorm layers the module holds."""
    synced = sum(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
    return {"sync": synced, "plain": sum(isinstance(m, _BatchNorm) for m in module.modules()) - synced}


def main(resnet_config: str, out: str) -> None:
    info = detect()
    init_distributed(info, torch.device("cpu"), "gloo")
    strategy = DDPStrategy(DistConfig(sync_bn=True, static_graph=True))
    logger, lines = logging.getLogger("pretrain"), []
    logger.setLevel(logging.INFO)
    logger.addHandler(handler := logging.Handler())
    handler.emit = lambda record: lines.append(record.getMessage())
    result = {}
    for name in (resnet_config, "tiny-clip"):
        try:
            wrapped = strategy.wrap(build_model(ModelConfig(name=name)).model, torch.device("cpu"))
        except ConfigError as e:
            result[name] = {"refused": str(e)}
            continue
        said = [line for line in lines if line.startswith("dist.sync_bn")]
        result[name] = {**kinds(wrapped.module), "static_graph": wrapped.static_graph, "log": said}
    if info.is_main:
        with open(out, "w") as f:
            json.dump(result, f)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
