"""CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models", arXiv 2109.01134): M context
vectors learned in the token-embedding space, CLIP frozen. Class c's prompt is `[SOT] [V]_1..[V]_M name .
[EOT]` (or the name in the middle / at the front); its text feature, through the frozen text tower, is class
c's classifier weight, and logits = logit_scale * cos(image feature, text feature).

The context is unified (one `[M, width]` for all classes) or class-specific (CSC, `[C, M, width]`), and starts
either from the embeddings of words ("a photo of a": then M = 4 and, with no training, the classifier is
exactly the zero-shot classifier of "a photo of a {c}.") or random (std 0.02, the paper's default, M = 16).
The image tower is frozen too, so image features may be computed once and passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.adapt.prompts import (
    POSITIONS,
    build_layout,
    context_from_text,
    encode_embeddings,
    insert_context,
    text_tower,
)

DEFAULT_N_CTX = 16
"""The paper's number of context vectors for a random initialisation."""


@dataclass
class CoOpConfig:
    """CoOp's hyper-parameters, with the paper's defaults (its Section 4.1 and the authors' configs)."""

    n_ctx: int | None = None
    """Context vectors M; null: 16 for a random start, the number of tokens of `ctx_init` otherwise (an
    explicit value must then equal it)."""
    ctx_init: str = ""
    """Words whose token embeddings start the context ("a photo of a"); empty: random, std 0.02."""
    class_specific: bool = False
    """CSC: one context per class (`[C, M, width]` parameters) instead of one shared by all (`[M, width]`)."""
    class_token_position: str = "end"
    """Where the class name goes: `end`, `middle` or `front` of the context."""
    lr: float = 0.002
    """SGD learning rate (momentum 0.9, cosine schedule, as in the paper)."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    """SGD weight decay (Dassl's default, which the paper's code uses)."""
    batch_size: int = 32
    epochs: int | None = None
    """Training epochs over the K-shot set; null: the paper's 200 for 16/8 shots, 100 for 4/2, 50 for 1; 0: no
    training (the initial prompts: with `ctx_init`, the zero-shot classifier of its words)."""
    warmup_epochs: int = 1
    """Epochs at the constant warm-up learning rate `warmup_lr` before the cosine schedule."""
    warmup_lr: float = 1e-5
    checkpoint_every: int = 0
    """Resumable checkpoint every N steps in `pretrain adapt` (0: at the end only)."""

    def __post_init__(self) -> None:
        if self.n_ctx is not None and self.n_ctx <= 0:
            raise ValueError(f"n_ctx: must be > 0, got {self.n_ctx}")
        if self.class_token_position not in POSITIONS:
            raise ValueError(
                f"class_token_position: must be one of {POSITIONS}, got {self.class_token_position!r}"
            )
        for name in ("lr", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"epochs: must be >= 0, got {self.epochs}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: must be >= 0, got {self.checkpoint_every}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("momentum, weight_decay, warmup_epochs: must be in [0, 1), >= 0, >= 0")

    def epochs_for(self, shots: int) -> int:
        """`epochs`, or the paper's schedule for `shots` examples per class."""
        if self.epochs is not None:
            return self.epochs
        return 200 if shots >= 8 else 100 if shots >= 2 else 50

    def steps_for(self, samples: int, shots: int) -> int:
        """Optimizer steps for `epochs_for(shots)` passes over `samples` training images in batches of
        `batch_size` (for a loop that counts steps)."""
        return self.epochs_for(shots) * math.ceil(samples / min(self.batch_size, samples))


class PromptLearner(nn.Module):
    """Learned prompts for `classnames` in front of a frozen open_clip model: `forward(image_features)`
    gives the logits `[B, C]`. The model is frozen here (`requires_grad` False, eval mode); only `ctx` (and
    whatever a subclass adds, e.g. PRE's encoder) is trainable."""

    def __init__(self, model: nn.Module, tokenizer, classnames: Sequence[str], cfg: CoOpConfig,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        self.clip = model.eval().requires_grad_(False)
        self.classnames = list(classnames)
        self.tokenizer, self.position = tokenizer, cfg.class_token_position
        tower = text_tower(model)  # looked up again at each use: moving the model replaces its buffers
        context = _initial_context(tower, tokenizer, cfg, len(self.classnames), generator)
        layout = build_layout(tokenizer, self.classnames, context.shape[-2], cfg.class_token_position)
        device = tower.token_embedding.weight.device
        self.register_buffer("tokens", layout.tokens.to(device), persistent=False)
        self.register_buffer("context_index", layout.context_index.to(device), persistent=False)
        with torch.no_grad():
            self.register_buffer("base", tower.token_embedding(self.tokens), persistent=False)
        self.ctx = nn.Parameter(context.to(device))

    def context(self) -> torch.Tensor:
        """The context vectors the prompts use (`[M, width]` or `[C, M, width]`); PRE re-parameterises them."""
        return self.ctx

    def prompts(self) -> torch.Tensor:
        """Token embeddings `[C, L, width]` of the class prompts with the context in its slots."""
        return insert_context(self.base, self.context_index, self.context())

    def text_features(self) -> torch.Tensor:
        """Normalised class text features `[C, D]`: the classifier's weights."""
        return F.normalize(encode_embeddings(text_tower(self.clip), self.prompts(), self.tokens), dim=-1)

    @torch.no_grad()
    def classifier(self, classnames: Sequence[str]) -> torch.Tensor:
        """The classifier `[D, C]` (as open_clip's `build_zero_shot_classifier` returns it) for any class
        names with the learned context: base-to-novel and cross-dataset evaluation. Class-specific context
        exists only for the classes it was trained on (a one-line ValueError otherwise). Call it in eval mode
        (PRE with 2 LSTM layers has dropout)."""
        if list(classnames) == self.classnames:
            return self.text_features().t()
        if self.ctx.dim() == 3:
            raise ValueError("class_specific: a class-specific context has no vectors for other classes")
        tower, context = text_tower(self.clip), self.context()
        layout = build_layout(self.tokenizer, list(classnames), context.shape[-2], self.position)
        tokens = layout.tokens.to(self.tokens.device)
        prompts = insert_context(
            tower.token_embedding(tokens), layout.context_index.to(tokens.device), context
        )
        return F.normalize(encode_embeddings(tower, prompts, tokens), dim=-1).t()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits `[B, C]` = logit_scale * cos(image features, class text features)."""
        image = F.normalize(image_features, dim=-1)
        return self.clip.logit_scale.exp() * image @ self.text_features().t()

    def train(self, mode: bool = True) -> PromptLearner:
        """Train the prompt parts only: the frozen model stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self


def _initial_context(tower, tokenizer, cfg: CoOpConfig, classes: int,
                     generator: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    """`[M, width]` (`[C, M, width]` class-specific): the embeddings of `cfg.ctx_init`'s tokens (the same
    words for every class), or random normal with std 0.02 (drawn independently per class)."""
    if cfg.ctx_init:
        context = context_from_text(tower, tokenizer, cfg.ctx_init)
        if cfg.n_ctx is not None and cfg.n_ctx != len(context):
            raise ValueError(
                f"n_ctx: {cfg.n_ctx} differs from the {len(context)} tokens of ctx_init {cfg.ctx_init!r}"
            )
        return context.unsqueeze(0).repeat(classes, 1, 1) if cfg.class_specific else context
    shape = (classes,) if cfg.class_specific else ()
    return torch.randn(*shape, cfg.n_ctx or DEFAULT_N_CTX, tower.width, generator=generator) * 0.02


def build_coop(model: nn.Module, tokenizer, classnames: Sequence[str], cfg: CoOpConfig | None = None,
               generator: torch.Generator | None = None) -> PromptLearner:  # fmt: skip
    """CoOp's classifier for `classnames` on a frozen open_clip `model` (its `tokenizer`)."""
    return PromptLearner(model, tokenizer, classnames, cfg or CoOpConfig(), generator)


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """`trainable` and `frozen` parameter counts of an adapted model, for the command to report."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def prompt_state(learner: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only (context, encoder): what a saved prompt learner needs beyond the model."""
    return {n: p.detach().clone() for n, p in learner.named_parameters() if p.requires_grad}


def load_prompt_state(learner: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `prompt_state`'s tensors back into a learner built with the same config and classes; a missing or
    extra name is a one-line ValueError."""
    own = dict(learner.named_parameters())
    wanted = {n for n, p in own.items() if p.requires_grad}
    if set(state) != wanted:
        raise ValueError(f"prompt state: holds {sorted(state)}, the learner trains {sorted(wanted)}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def build_optimizer(learner: nn.Module, cfg: CoOpConfig, steps: int, warmup_steps: int = 0):
    """The paper's SGD on the trainable parameters with a constant warm-up at `warmup_lr` for
    `warmup_steps`, then cosine decay to 0 over the remaining steps (returns optimizer, scheduler)."""
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    decay = max(1, steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return cfg.warmup_lr / cfg.lr
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, decay) / decay))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit_prompts(learner: nn.Module, features: torch.Tensor, labels: torch.Tensor, cfg: CoOpConfig,
                steps: int, generator: torch.Generator | None = None) -> list[float]:  # fmt: skip
    """`steps` SGD steps of cross-entropy on precomputed image `features` `[N, D]` (minibatches of
    `cfg.batch_size` drawn by `generator`), no warm-up; the losses per step. A small loop for callers
    without their own (the command's loop handles epochs, ranks and resume)."""
    optimizer, schedule = build_optimizer(learner, cfg, steps)
    learner.train()
    losses = []
    for _ in range(steps):
        batch = torch.randperm(len(features), generator=generator)[: cfg.batch_size]
        loss = F.cross_entropy(learner(features[batch]), labels[batch])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"prompt learning: non-finite loss {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses
