"""The fast-step options that are not model transforms: the AdamW implementation (`train.fused_adamw`) and
the compiled contrastive loss (`train.compile`). Blocks are compiled by the strategy (parallel/base.py),
patch dropout is a model option (model.py), the side-stream copy of batches is `pretrain.data.prefetch`."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from pretrain.config import ConfigError, TrainConfig

log = logging.getLogger("pretrain")

ADAMW_KINDS = {"fused": {"fused": True}, "default": {}}
"""AdamW keyword arguments of each implementation: fused (one kernel for all parameters), default (torch's
choice for the device: the multi-tensor `foreach` kernels on CUDA, a loop over parameters on CPU)."""


def adamw_kind(params: Iterable[torch.Tensor], mode: str) -> str:
    """The AdamW implementation for `train.fused_adamw=mode`: `true` fused, `false` the default,
    `auto` fused when every trainable parameter is on CUDA, else the default."""
    if mode == "true":
        return "fused"
    on_cuda = [p.device.type == "cuda" for p in params if p.requires_grad]
    if mode == "auto" and on_cuda and all(on_cuda):
        return "fused"
    return "default"


def build_adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameter `groups` in the implementation `train.fused_adamw` asks for (logged);
    `true` where torch refuses the fused kernel (a device or dtype it has none for) is a ConfigError."""
    params = [p for g in groups for p in g["params"]]
    kind = adamw_kind(params, cfg.fused_adamw)
    if kind == "fused":
        _check_fused(params)
    options = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **ADAMW_KINDS[kind])
    optimizer = torch.optim.AdamW(groups, **options)
    log.info("optimizer: AdamW (%s, train.fused_adamw=%s)", kind, cfg.fused_adamw)
    return optimizer


def _check_fused(params: list[torch.Tensor]) -> None:
    """Step a fused AdamW once on a one-element tensor of each (device, dtype) of `params`: torch only
    checks them at the first step, and a refusal there should be a config error before training starts."""
    for device, dtype in {(p.device, p.dtype) for p in params if p.requires_grad}:
        probe = torch.nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
        probe.grad = torch.zeros_like(probe)
        try:
            torch.optim.AdamW([probe], fused=True).step()
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
            raise ConfigError(
                f"train.fused_adamw: true, but torch has no fused AdamW here: {reason}"
            ) from None


def apply_compile_loss(objective) -> None:
    """torch.compile the objective's contrastive call (`train.compile`), in place on this objective."""
    objective.contrastive = torch.compile(objective.contrastive)
