"""GLAD's gradient regulariser (Peng et al., "GLAD: Generalizable Tuning for Vision-Language Models",
arXiv 2507.13089): LoRA training whose gradient is steered toward the sharpness-aware (SAM) gradient.

The paper (Fig. 1) uses the gradient computed via Sharpness-Aware Minimization (Foret et al. 2021) as a
reference signal that steers the original gradient toward parameter regions that are both stable and fit the
task. Written out, with θ the LoRA parameters and L the training loss on the batch:

    g      = ∇θ L(θ)
    ε      = ρ · g / ‖g‖₂                        (SAM's ascent step, treated as a constant)
    g_sam  = ∇θ L(θ + ε)                          (the reference, treated as a constant)
    R(θ)   = λ · (1 − cos(g, g_sam))              (the term added to L)

Minimising L + R moves θ down the loss while turning its own gradient toward the SAM gradient; R's gradient
differentiates g (a Hessian-vector product), so `glad_objective` builds the first gradient with
`create_graph=True` and runs attention on PyTorch's math kernel, the one with a double backward.
Caveat: only the paper's abstract and figure caption could be read here, not its equations; the cosine form
above and the defaults below (ρ = 0.05, SAM's default; λ = 1) are this project's reading of that caption.
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


@dataclass
class GLADConfig:
    """The regulariser's two hyper-parameters."""

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


def glad_objective(
    model: nn.Module,
    batch: Any,
    compute_loss: LossFn,
    cfg: GLADConfig,
    params: Sequence[nn.Parameter] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L(θ), R(θ)) on `batch`: back-propagate their sum. `compute_loss(model, batch)` is the training loss
    (it runs twice: at θ and at θ + ε); `params` default to the model's LoRA parameters."""
    params = list(params) if params is not None else lora_parameters(model)
    with double_backward_attention():
        loss = compute_loss(model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        g = flat(grads)
        norm = g.detach().norm().clamp_min(1e-12)
        step = [cfg.rho * gi.detach() / norm for gi in grads]
        with perturbed(params, step):
            g_sam = flat(torch.autograd.grad(compute_loss(model, batch), params)).detach()
    term = cfg.weight * (1 - torch.nn.functional.cosine_similarity(g, g_sam, dim=0))
    return loss, term


__all__ = ["GLADConfig", "double_backward_attention", "glad_objective"]
