"""GLAD's gradient regulariser (Peng et al., "GLAD: Generalizable Tuning for Vision-Language Models",
arXiv 2507.13089): LoRA training whose gradient is steered toward the sharpness-aware (SAM) gradient.

The paper (Fig. 1) uses the gradient computed via Sharpness-Aware Minimization (Foret et al. 2021) as a
reference signal that steers the original gradient toward parameter regions that are both stable and fit the
task. Written out, with θ the LoRA parameters and L the training loss on the (global) batch:

    g      = ∇θ L(θ)
    ε      = ρ · g / ‖g‖₂                        (SAM's ascent step, treated as a constant)
    g_sam  = ∇θ L(θ + ε)                          (the reference, treated as a constant)
    R(θ)   = λ · (1 − cos(g, g_sam))              (the term added to L)

Minimising L + R moves θ down the loss while turning its own gradient toward the SAM gradient; R's gradient
differentiates g (a Hessian-vector product), so `glad_objective` builds the first gradient with
`create_graph=True` and runs attention on PyTorch's math kernel, the one with a double backward.

RECONSTRUCTION, not the paper's equation: the paper's method section, equations and hyper-parameters could
not be read here (only its abstract and Fig. 1 caption were reachable, and the authors' repository
github.com/YuqiPeng77/GLAD holds a README saying the code will be released). The cosine form above and the
defaults below (ρ = 0.05, SAM's default; λ = 1) are this project's reading of that caption.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.adapt.lora import lora_parameters

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Average = Callable[[torch.Tensor], torch.Tensor]
"""The mean of a tensor over the ranks of a data-parallel job (each rank holding an equal share of the batch)."""


@dataclass
class GLADConfig:
    """The regulariser's two hyper-parameters (a reconstruction: see the module's docstring)."""

    rho: float = 0.05
    """ρ: the radius of SAM's ascent step in LoRA-parameter space."""
    weight: float = 1.0
    """λ: the weight of the term 1 − cos(g, g_sam) in the loss."""

    def __post_init__(self) -> None:
        if self.rho <= 0:
            raise ValueError(f"glad.rho: must be positive, got {self.rho}")
        if self.weight < 0:
            raise ValueError(f"glad.weight: must be non-negative, got {self.weight}")


@contextmanager
def double_backward_attention() -> Iterator[None]:
    """Attention on the math kernel: the fused CPU/GPU kernels have no second derivative."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@contextmanager
def perturbed(params: Sequence[nn.Parameter], step: Sequence[torch.Tensor]) -> Iterator[None]:
    """θ + ε inside the block, exactly θ after it. Through `.data`, so the graph already built at θ (which
    saved θ for its backward) does not see an in-place change."""
    saved = [p.detach().clone() for p in params]
    for p, s in zip(params, step):
        p.data.add_(s)
    try:
        yield
    finally:
        for p, s in zip(params, saved):
            p.data.copy_(s)


def global_value(local: torch.Tensor, average: Average | None) -> torch.Tensor:
    """`local` with the value of its mean over ranks but the derivative of `local` itself: what each rank
    differentiates so that the mean of the ranks' gradients (DDP's) is the gradient of the global batch."""
    if average is None:
        return local
    return local + (average(local.detach()) - local.detach())


def glad_objective(
    model: nn.Module,
    batch: Any,
    compute_loss: LossFn,
    cfg: GLADConfig,
    params: Sequence[nn.Parameter] | None = None,
    average: Average | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L(θ), R(θ)) on `batch`: back-propagate their sum. `compute_loss(model, batch)` is the training loss
    (it runs twice: at θ and at θ + ε); `params` default to the model's LoRA parameters.

    Data-parallel: `batch` is this rank's equal share of the global batch and `average` the mean over ranks.
    g and g_sam are then the global batch's (the mean of the ranks' gradients, as one process computes them
    on the whole batch), so ε and R are the global ones on every rank, and R's gradient on this rank is its
    share H_r · ∂R/∂g of the Hessian-vector product: the mean over ranks of the returned terms' gradients,
    which DDP's all-reduce computes, is exactly ∇R of the global batch."""
    params = list(params) if params is not None else lora_parameters(model)
    with double_backward_attention():
        loss = compute_loss(model, batch)
        g = global_value(flat(torch.autograd.grad(loss, params, create_graph=True)), average)
        norm = g.detach().norm().clamp_min(1e-12)
        step = torch.split(cfg.rho * g.detach() / norm, [p.numel() for p in params])
        with perturbed(params, [s.view_as(p) for s, p in zip(step, params)]):
            g_sam = flat(torch.autograd.grad(compute_loss(model, batch), params)).detach()
    if average is not None:
        g_sam = average(g_sam)
    term = cfg.weight * (1 - torch.nn.functional.cosine_similarity(g, g_sam, dim=0))
    return loss, term


__all__ = ["Average", "GLADConfig", "double_backward_attention", "glad_objective"]
