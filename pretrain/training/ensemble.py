"""Weight ensembling (ZSCL's WE, `train.weight_ensemble_every=N`): a running average of the weights.

The average starts from the initial weights (count 1) and every N optimizer steps folds in the current
weights: `avg = (avg * k + w) / (k + 1)`, k the number of weights averaged so far (ZSCL's `merge_we`). So
after step s it is the plain mean of the weights at steps 0, N, 2N, ..., <= s. It is saved in each checkpoint
(`ensemble.safetensors`, full tensors, with k in `trainer.pt`), so a resumed run continues it exactly, and
`pretrain export --weights ensemble` exports it instead of the final weights. Under FSDP each rank averages
its own shards; saving gathers them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from pretrain.config import Config, ConfigError
from pretrain.parallel.distributed import world

ENSEMBLE_FILE = "ensemble.safetensors"
"""The averaged weights in a checkpoint folder (parameter names as in the model)."""


class WeightEnsemble:
    """The running average of a model's parameters (local shards under FSDP)."""

    def __init__(self, model: nn.Module, every: int) -> None:
        self.model, self.every, self.count = model, every, 1
        self.average = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the current weights when `step` is a multiple of `every`."""
        if step % self.every:
            return
        k = self.count
        for name, param in self.model.named_parameters():
            self.average[name].mul_(k).add_(param.detach()).div_(k + 1)
        self.count = k + 1

    def state_dict(self) -> int:
        return self.count  # the number of weights averaged: `ensemble_count` in trainer.pt

    def load_state_dict(self, count: int) -> None:
        self.count = count

    def save(self, folder: Path) -> None:
        """Write the full averaged tensors (every rank takes part in gathering shards; rank 0 writes)."""
        full = {name: _full(t).detach().cpu().contiguous() for name, t in self.average.items()}
        if world()[0] == 0:
            save_file(full, str(folder / ENSEMBLE_FILE))

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        """Restore the average saved in `folder` (re-sharded like the parameters)."""
        saved = load_file(str(folder / ENSEMBLE_FILE))
        for name, avg in self.average.items():
            full = saved[name].reshape(avg.shape).to(avg.dtype)  # a DTensor's shape is its global shape
            if isinstance(avg, DTensor):
                avg.copy_(distribute_tensor(full.to(avg.device), avg.device_mesh, avg.placements))
            else:
                avg.copy_(full)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def build_weight_ensemble(cfg: Config, model: nn.Module) -> WeightEnsemble | None:
    """The ensemble of `train.weight_ensemble_every` over the wrapped model's parameters, or None (0)."""
    every = cfg.train.weight_ensemble_every
    if not every:
        return None
    if cfg.dist.strategy == "deepspeed":
        raise ConfigError(
            f"train.weight_ensemble_every: {every} is not supported with dist.strategy=deepspeed (the engine "
            "owns the weights); use dist.strategy=ddp or fsdp"
        )
    return WeightEnsemble(model, every)


@torch.no_grad()
def apply_ensemble(folder: Path, model: nn.Module) -> None:
    """Load a checkpoint's averaged weights into a plain model (for `pretrain export --weights ensemble`)."""
    path = folder / ENSEMBLE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--weights ensemble: {folder} has no {ENSEMBLE_FILE} (the run had train.weight_ensemble_every=0)"
        )
    saved = load_file(str(path))
    for name, param in model.named_parameters():
        param.copy_(saved[name].reshape(param.shape))
