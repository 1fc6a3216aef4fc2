"""The training loop the adaptation methods share: a module holding the trainable parameters, a loss over a
batch of sample indices, AdamW or SGD with a cosine schedule, DDP when launched with torchrun, and exact
resume from checkpoints in the output folder.

The batches are a plan, not a replay: the global batch of step `s` is positions `[s·B, (s+1)·B)` of an endless
stream of seeded per-epoch permutations of the training samples, and rank `r` of `W` takes its contiguous
`B/W` slice (as `pretrain train`'s synthetic data). The loss is a mean over the rank's slice and DDP averages
gradients over ranks, so W ranks step exactly like one rank on the same global batch. Anything random inside
a step (augmentation, dropout) draws from a generator seeded by (seed, step, rank): a resumed run redraws it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from pretrain.parallel.distributed import world
from webshards.atomic import atomic_path, write_atomic

log = logging.getLogger("pretrain")
CHECKPOINTS = "checkpoints"
LATEST = "latest"
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
"""`loss(model, indices, generator)`: the mean loss over the training samples at `indices` (this rank's
slice of the step's batch). `model` is the trainable module, DDP-wrapped on several ranks: call it once per
step (its forward is what DDP syncs gradients for); `generator` is for anything random in the step."""


@dataclass
class LoopConfig:
    """How the shared loop trains (each method's config fills these with its paper's defaults)."""

    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 32
    """Global batch (samples over all ranks); capped at the training set size, a multiple of the ranks."""
    lr: float = 0.002
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    optimizer: str = "sgd"
    """`sgd` (with `momentum`) or `adamw`."""
    momentum: float = 0.9
    """SGD momentum."""
    schedule: str = "cosine"
    """`cosine` (to 0 at the last step, after `warmup`) or `constant`."""
    warmup: int = 0
    """Warm-up steps (before the schedule's decay starts)."""
    warmup_lr: float | None = None
    """None: the warm-up ramps linearly to `lr`; a value: it holds this constant learning rate (CoOp's and
    PRE's 1e-5 for the first epoch)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    seed: int = 0
    """Seeds the batch order and per-step randomness."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.warmup_lr is not None and self.warmup_lr < 0:
            raise ValueError(f"warmup_lr must be at least 0, got {self.warmup_lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


def global_batch(size: int, samples: int, ranks: int) -> int:
    """The batch actually used: `size` capped at `samples`, rounded down to a multiple of `ranks`."""
    return max(ranks, min(size, samples) // ranks * ranks)


def batch_indices(step: int, batch: int, samples: int, seed: int) -> torch.Tensor:
    """The global batch of `step`: positions `[step·batch, (step+1)·batch)` of the stream of per-epoch
    permutations (epoch `e` shuffled by a generator seeded with (seed, e))."""
    start, parts = step * batch, []
    while sum(len(p) for p in parts) < batch:
        epoch, offset = divmod(start, samples)
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = order[offset : offset + batch - sum(len(p) for p in parts)]
        parts.append(take)
        start += len(take)
    return torch.cat(parts)


def learning_rate(cfg: LoopConfig, step: int) -> float:
    """The learning rate of `step` (0-based): warm-up (linear, or constant at `warmup_lr`), then constant or
    cosine to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup if cfg.warmup_lr is None else cfg.warmup_lr
    if cfg.schedule == "constant":
        return cfg.lr
    done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * done)) * cfg.lr


def build_optimizer(params: list[torch.nn.Parameter], cfg: LoopConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the loop trains (those that require gradients), by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def count_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in trainable(module).values())


def train(
    module: torch.nn.Module, loss_fn: LossFn, samples: int, cfg: LoopConfig, output: Path | None
) -> dict:
    """Train `module`'s trainable parameters for `cfg.steps` on `samples` training samples; resumes from
    `output/checkpoints` when a checkpoint is there, saves one every `cfg.checkpoint_every` steps and at the
    end (`output` None: no checkpoints, e.g. a hyper-parameter sweep). Returns `{"steps", "final_loss"}`."""
    rank, ranks = world()
    params = list(trainable(module).values())
    if not params:
        raise ValueError("the method left no trainable parameters")
    optimizer = build_optimizer(params, cfg)
    start = load_checkpoint(output, module, optimizer) if output is not None else 0
    model = DistributedDataParallel(module) if ranks > 1 else module
    batch = global_batch(cfg.batch_size, samples, ranks)
    share = batch // ranks
    loss = torch.zeros(())
    for step in range(start, cfg.steps):
        indices = batch_indices(step, batch, samples, cfg.seed)[rank * share : (rank + 1) * share]
        generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + rank)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, indices, generator)
        if not torch.isfinite(loss):
            raise RuntimeError(f"adapt: the loss is {loss.item()} at step {step}")
        loss.backward()
        optimizer.step()
        done = step + 1
        if output is not None and (
            done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        ):
            save_checkpoint(output, module, optimizer, done)
    return {"steps": cfg.steps, "final_loss": float(loss.detach())}


def save_checkpoint(
    output: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> None:
    """`output/checkpoints/step_N.pt` (trainable parameters, optimizer state, step) and `latest`, on rank 0;
    every rank waits for it, so a rank stopped after this step finds it."""
    if world()[0] == 0:
        folder = Path(output) / CHECKPOINTS
        folder.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "trainable": {n: p.detach().clone() for n, p in trainable(module).items()},
                 "optimizer": optimizer.state_dict()}  # fmt: skip
        name = f"step_{step:08d}.pt"
        with atomic_path(folder / name) as tmp:
            torch.save(state, tmp)
        write_atomic(folder / LATEST, name.encode())
    if world()[1] > 1:
        torch.distributed.barrier()


def load_checkpoint(output: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore the newest checkpoint in `output` into `module` and `optimizer`; returns its step (0: none)."""
    latest = Path(output) / CHECKPOINTS / LATEST
    if not latest.is_file():
        return 0
    path = latest.parent / latest.read_text().strip()
    state = torch.load(path, weights_only=True)
    params = trainable(module)
    if set(state["trainable"]) != set(params):
        raise ValueError(f"{path}: its trainable parameters are not this method's (another method's folder?)")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    log.info("adapt: resumed from %s (step %d)", path, state["step"])
    return int(state["step"])
