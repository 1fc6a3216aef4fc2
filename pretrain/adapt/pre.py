"""PRE (Pham et al. 2023, "PRE: Vision-Language Prompt Learning with Reparameterization Encoder", arXiv
2309.07760): CoOp's context vectors are not used directly but re-parameterised by a small prompt encoder,
CLIP frozen; the paper reports better accuracy on novel classes than CoOp at the same cost.

The encoder, as the authors define it (their `PromptEncoder`, module type `LSTM1` with `residual=True`, the
configuration behind their reported results): a bidirectional LSTM over the M context vectors as a sequence,
hidden size width/2 per direction (so its output is width wide), plus a residual connection:

    context' = ctx + BiLSTM(ctx)

trained jointly with `ctx` (initialised from "a photo of a", their config). With class-specific context each
class's M vectors are one sequence. At initialisation the encoder is *not* the identity: the LSTM starts from
PyTorch's default weights, so context' = ctx + BiLSTM(ctx) != ctx and, unlike CoOp, PRE with no training is
not the zero-shot classifier of "a photo of a {c}.".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.adapt.coop import CoOpConfig, PromptLearner


@dataclass
class PREConfig(CoOpConfig):
    """PRE's hyper-parameters: CoOp's fields (defaults from the authors' config: context from "a photo of a",
    SGD lr 0.002, batch 32, 50 epochs, 1 warm-up epoch at 1e-5) and the prompt encoder's."""

    ctx_init: str = "a photo of a"
    epochs: int | None = 50
    layers: int = 1
    """LSTM layers (`LSTM1` / `LSTM2` in the authors' code; 1 is the one reported)."""
    residual: bool = True
    """Add the encoder's input to its output (the paper's residual connection)."""
    dropout: float = 0.05
    """Dropout between LSTM layers (the authors' 0.05; no effect with one layer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers not in (1, 2):
            raise ValueError(f"layers: must be 1 or 2, got {self.layers}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")


class PromptEncoder(nn.Module):
    """context' = context + BiLSTM(context) (without `residual`: BiLSTM(context)), over `[M, width]` (one
    sequence) or `[C, M, width]` (one per class)."""

    def __init__(self, width: int, layers: int = 1, residual: bool = True, dropout: float = 0.05) -> None:
        super().__init__()
        if width % 2:
            raise ValueError(f"PRE: the text width {width} must be even (a BiLSTM of width/2 per direction)")
        self.residual = residual
        self.lstm = nn.LSTM(
            width, width // 2, num_layers=layers, bidirectional=True, batch_first=True,
            dropout=dropout if layers > 1 else 0.0,  # torch warns about dropout with a single layer
        )  # fmt: skip

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        batched = context if context.dim() == 3 else context.unsqueeze(0)
        encoded = self.lstm(batched)[0]
        encoded = encoded if context.dim() == 3 else encoded.squeeze(0)
        return encoded + context if self.residual else encoded


class PRELearner(PromptLearner):
    """CoOp's prompt learner whose prompts use the encoded context; trainable: `ctx` and the encoder."""

    def __init__(self, model: nn.Module, tokenizer, classnames: Sequence[str], cfg: PREConfig,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__(model, tokenizer, classnames, cfg, generator)
        self.encoder = PromptEncoder(self.ctx.shape[-1], cfg.layers, cfg.residual, cfg.dropout)
        self.encoder.to(self.ctx.device)

    def context(self) -> torch.Tensor:
        return self.encoder(self.ctx)


def build_pre(model: nn.Module, tokenizer, classnames: Sequence[str], cfg: PREConfig | None = None,
              generator: torch.Generator | None = None) -> PRELearner:  # fmt: skip
    """PRE's classifier for `classnames` on a frozen open_clip `model` (its `tokenizer`); the encoder's LSTM
    starts from PyTorch's default initialisation (seed torch's RNG for a reproducible start)."""
    return PRELearner(model, tokenizer, classnames, cfg or PREConfig(), generator)
