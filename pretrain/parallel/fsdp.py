"""FSDP2 (`fully_shard`): parameters, gradients and optimizer states sharded across ranks.

Order (torchtitan's): activation checkpointing -> compile -> `fully_shard` per transformer block of each
tower -> `fully_shard` on the root. Checkpoints are sharded torch.distributed.checkpoint (DCP) folders that
any world size can load (DCP reshards on load), and a process without a process group can read too.
They are read through `safe_dcp_load`, which runs no code from the checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from pretrain.parallel.base import Strategy, apply_vector_scalars, transformer_blocks, vector_scalar_views
from pretrain.parallel.safe_load import safe_dcp_load

DCP_DIR = "dcp"
"""Sub-folder of a step folder holding the DCP checkpoint (model and optimizer)."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def apply_fully_shard(model: nn.Module, **shard_kwargs) -> None:
    """Shard each transformer block, then the root (embeddings, projections, logit scale)."""
    for block in transformer_blocks(model):
        fully_shard(block, **shard_kwargs)
    fully_shard(model, **shard_kwargs)


@contextlib.contextmanager
def _root_gathered(module: FSDPModule) -> Iterator[None]:
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


@contextlib.contextmanager
def _gradient_sync_off(module: FSDPModule) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def load_dcp_weights(folder: Path, model: nn.Module) -> None:
    """Load the model part of an FSDP checkpoint into a plain (unsharded) model, no process group needed."""
    state = vector_scalar_views(model)
    safe_dcp_load({"model": state}, folder / DCP_DIR, no_dist=not dist.is_initialized())


class FSDPStrategy(Strategy):
    name = "fsdp"
    collective_eval = True

    def shard_kwargs(self) -> dict:
        """fully_shard options from the config: mixed precision, resharding, CPU offload."""
        param = self.cfg.param_dtype
        if param == "auto":
            param = "bf16" if self.precision == "bf16" else "fp32"
        kwargs = {
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=DTYPES[param], reduce_dtype=DTYPES[self.cfg.reduce_dtype]
            ),
            "reshard_after_forward": self.cfg.reshard_after_forward,
        }
        if self.cfg.offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        return kwargs

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        model = self.prepare(model.to(device))
        apply_vector_scalars(model)
        # One process (e.g. resuming a sharded run on a single device) trains the plain model.
        if dist.is_initialized():
            apply_fully_shard(model, **self.shard_kwargs())
        return model

    def wrap_frozen(self, model: nn.Module, device: torch.device) -> nn.Module:
        """A forward-only model sharded like the student (per block, then the root): each rank keeps 1/W of
        its weights and gathers a block's weights only while that block runs."""
        model = super().wrap_frozen(model, device)
        apply_vector_scalars(model)
        if dist.is_initialized():
            apply_fully_shard(model, **self.shard_kwargs())
        return model

    def step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float
    ) -> torch.Tensor | float | None:
        """As the base class; the norm of sharded gradients is a DTensor, made whole here (a scalar
        all-reduce on device, no host sync) so that every strategy returns a plain tensor."""
        norm = super().step(module, optimizer, grad_clip)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        if isinstance(module, FSDPModule):
            return _gradient_sync_off(module)
        return contextlib.nullcontext()

    def eval_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """encode_image / encode_text bypass the root's forward hooks: gather the root's own weights
        (embeddings, projections) for the eval; the blocks gather theirs in their own forward."""
        return _root_gathered(model) if isinstance(model, FSDPModule) else contextlib.nullcontext()

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def save(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, is_main: bool) -> None:
        """Every rank writes its shards (model + optimizer, keyed by parameter name)."""
        model_state, optim_state = get_state_dict(module, optimizer)
        dcp.save(
            {"model": model_state, "optim": optim_state},
            checkpoint_id=str(folder / DCP_DIR),
            no_dist=not dist.is_initialized(),
        )

    def load(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Read this rank's shards at the current world size (DCP reshards), then hand them to the model."""
        if optimizer is None:
            load_dcp_weights(folder, module)
            return
        model_state, optim_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optim": optim_state}
        safe_dcp_load(state, folder / DCP_DIR, no_dist=not dist.is_initialized())
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
