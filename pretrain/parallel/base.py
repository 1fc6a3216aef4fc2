"""The one interface every parallel strategy implements (single process, DDP, FSDP2, DeepSpeed)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch import nn

from pretrain.config import DistConfig
from pretrain.parallel.safe_load import safe_load

BLOCK_TYPES = (ResidualAttentionBlock, CustomResidualAttentionBlock)
"""open_clip's transformer blocks (self- and cross-attention), wherever they sit in a model."""


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of the model, outermost first and each once: open_clip's block types and
    the members of any `resblocks` list, found by walking the module tree (so CoCa's `text` tower and its
    `text_decoder`, self- and cross-attention blocks, are found as well as CLIP's two towers). These are
    the units of compiling and sharding; a block inside another found block is left to its parent."""
    found: list[tuple[str, nn.Module]] = []
    in_list: set[int] = set()
    for name, module in model.named_modules():  # pre-order: a parent comes before its children
        if any(name.startswith(f"{parent}.") for parent, _ in found):
            continue
        if isinstance(module, BLOCK_TYPES) or id(module) in in_list:
            found.append((name, module))
        elif name.rsplit(".", 1)[-1] == "resblocks" and isinstance(module, nn.ModuleList):
            in_list.update(id(block) for block in module)
    return [module for _, module in found]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block in backward (open_clip's own per-block non-reentrant checkpointing)."""
    model.set_grad_checkpointing(True)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place: the module tree (and checkpoint keys) stay as they are."""
    for block in transformer_blocks(model):
        block.compile()


def apply_vector_scalars(model: nn.Module) -> None:
    """Turn 0-dim parameters (CLIP's logit_scale) into shape [1]: FSDP2 cannot shard a scalar and
    DeepSpeed cannot broadcast one. Checkpoints then hold shape [1]; see `vector_scalar_views`."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.ndim == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1), param.requires_grad))


def vector_scalar_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a plain model with scalars seen as shape-[1] views, to load such checkpoints in place."""
    return {k: v.reshape(1) if v.ndim == 0 else v for k, v in model.state_dict().items()}


class Strategy:
    """Wraps the model for training, steps the optimizer, and saves/loads its own checkpoint files.

    The base class is the single-process strategy; subclasses override what their engine does differently.
    """

    name = "single"
    collective_eval = False
    """True when the model can only run forward on all ranks together (sharded weights): eval then runs
    on every rank and only rank 0 reports."""
    compile_blocks = False
    """torch.compile each transformer block in `prepare` (`train.compile`, set by `build_strategy`)."""

    def __init__(self, cfg: DistConfig | None = None, precision: str = "fp32") -> None:
        self.cfg = cfg or DistConfig()
        self.precision = precision

    def prepare(self, model: nn.Module) -> nn.Module:
        """Model transforms in their fixed order: activation checkpointing, then compile (then sharding)."""
        if self.cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.compile_blocks:
            apply_compile(model)
        return model

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        return self.prepare(model.to(device))

    def wrap_frozen(self, model: nn.Module, device: torch.device) -> nn.Module:
        """A model that only runs forward (a distillation teacher): on the device, in eval mode, without
        gradients (so no optimizer state and no gradient reduction); replicated unless a strategy shards it."""
        model.to(device).eval().requires_grad_(False)
        return model

    def attach_optimizer(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Hand the optimizer to the engine; engines that own it (DeepSpeed) return their own pair."""
        return module, optimizer

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Context for micro-steps whose gradients need no cross-rank reduction yet."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float
    ) -> torch.Tensor | float | None:
        """Clip (when `grad_clip` > 0), step, zero the gradients; returns the global pre-clip gradient norm,
        a device tensor read only on log steps (no host sync here)."""
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        """Context in which `params` are whole and in-place changes stick (DeepSpeed stage 3 partitions them)."""
        return contextlib.nullcontext()

    def eval_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context in which `model.encode_image` / `encode_text` can be called directly (for eval)."""
        return contextlib.nullcontext()

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A parameter as one plain tensor (sharded strategies gather it; call on every rank)."""
        return tensor

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
            state = safe_load(folder / "optimizer.pt", map_location=_device_of(module))
            optimizer.load_state_dict(state)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
