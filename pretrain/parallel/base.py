"""The one interface every parallel strategy implements (DDP now; FSDP2 and DeepSpeed plug in here)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn


class Strategy:
    """Wraps the model for training, steps the optimizer, and saves/loads its own checkpoint files.

    The base class is the single-process strategy; subclasses override what their engine does differently.
    """

    name = "single"

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        return model.to(device)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Context for micro-steps whose gradients need no cross-rank reduction yet."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float
    ) -> torch.Tensor | None:
        """Clip, step, zero the gradients; returns the pre-clip gradient norm (on device) if clipping."""
        norm = None
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, is_main: bool) -> None:
        """Write model and optimizer state into `folder` (a full state, written by the main rank)."""
        from safetensors.torch import save_model

        if is_main:
            save_model(self.unwrap(module), str(folder / "model.safetensors"))
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        from safetensors.torch import load_model

        load_model(self.unwrap(module), str(folder / "model.safetensors"), device=str(_device_of(module)))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=_device_of(module)))


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
