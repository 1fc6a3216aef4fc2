"""The training objective: a contrastive loss plus extra terms, split into the named parts the trainer logs.

The trainer names no concrete loss: `pretrain.objectives.registry.build_objective` builds the objective of
`loss.name` (or of the model) with the extra terms of the config, and the trainer uses it in one fixed way that
keeps gradient accumulation exact:

1. `begin_step(micro)` sees the step's micro-batches once, before the micro-steps (a term counts the step's
   target tokens over all ranks there, or a teacher encodes the batches without grad).
2. Each micro-step, `compute(step, last)` returns the parts. `contrastive` is the pairwise term: it sees the
   features of *all* micro-batches of the step (the fresh micro-batch between the no-grad cached rest), so
   every accumulated sample is a negative; gradients flow only through that micro-batch's features, and the
   logit scale and bias get theirs only in the last micro-step. Its value is the term over the whole
   accumulated batch of this rank (the last micro-step's value is the step's). A `Term` says by its `when`
   what it sees: "pairwise" terms are computed the same way (the last value counts); "micro" terms on one
   micro-batch alone, summed over the micro-steps (a rank's sum, averaged over ranks as the strategies
   average gradients, must be the term over the global batch: CoCa's caption cross-entropy is normalised by
   the step's global token count so that it does not change when a batch is split, whatever the caption
   lengths); "step" terms once per step in the last micro-step, on their own inputs.
3. `total(parts)` is the weighted sum that is back-propagated and logged as `loss`; every part is also
   logged, as `loss_<part>`. `state_dict()` is the objective's own resume state (ZSCL's reference-data
   position), saved per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from pretrain.config import LossConfig


class Features(NamedTuple):
    """The contrastive inputs of one forward pass, read by name from the model's dict output (fp32)."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None

    def detached_scalars(self) -> Features:
        """The same features with the logit scale and bias cut from the graph (all micro-steps but the last)."""
        bias = None if self.logit_bias is None else self.logit_bias.detach()
        return self._replace(logit_scale=self.logit_scale.detach(), logit_bias=bias)


def features(output: dict) -> Features:
    """The features of an open_clip dict output (`output_dict=True`; CoCa always returns a dict), upcast
    to fp32 for the loss."""
    bias = output.get("logit_bias")
    return Features(
        output["image_features"].float(),
        output["text_features"].float(),
        output["logit_scale"].float(),
        None if bias is None else bias.float(),
    )


class MicroStep(NamedTuple):
    """What a micro-step offers the terms: this rank's accumulated `features` (the micro-batches in step order,
    this one's with grad), the model's dict `output` on this micro-batch (bf16 under autocast), its input
    `texts`, and `encode_images`: the trained model's fp32 image features of other images, with grad."""

    features: Features
    output: dict
    texts: torch.Tensor
    encode_images: Callable[[torch.Tensor], torch.Tensor]


class Term:
    """One named, weighted part beside the contrastive one (a caption loss, a distillation term)."""

    name: str = ""
    """The logged part: `loss_<name>` in metrics.jsonl."""
    when: str = "pairwise"
    """pairwise, micro or step (see the module docstring)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def begin_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Called once per optimizer step with its (images, texts) micro-batches, before the micro-steps."""

    def __call__(self, step: MicroStep) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """This rank's resume state of the term, merged into the objective's."""
        return {}

    def load_state_dict(self, states: list[dict]) -> None:
        """Restore from the objective's merged state of every rank that saved it (in rank order: the run may
        have another number of ranks now)."""

    def close(self) -> None:
        """Release what the term holds open (a reference-data stream)."""


class Objective:
    """`weight` x the contrastive `loss` over the accumulated features, plus `terms`."""

    def __init__(self, loss: nn.Module, weight: float, terms: Sequence[Term] = (), takes_bias: bool = False):
        self.loss, self.weight, self.terms, self.takes_bias = loss, weight, list(terms), takes_bias

    @property
    def parts(self) -> tuple[str, ...]:
        """Names of the logged parts; "contrastive" first, always present."""
        return ("contrastive", *(term.name for term in self.terms))

    def contrastive(self, *features: torch.Tensor | None) -> torch.Tensor:
        """The pairwise term over this rank's accumulated `Features` (negatives from all ranks); the logit
        bias goes only to a loss that `takes_bias` (siglip)."""
        return self.loss(*(features if self.takes_bias else features[:3]))

    def begin_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for term in self.terms:
            term.begin_step(micro)

    def compute(self, step: MicroStep, last: bool) -> dict[str, torch.Tensor]:
        """The parts of one micro-step ("step" terms only in the `last`)."""
        parts = {"contrastive": self.contrastive(*step.features)}
        return parts | {term.name: term(step) for term in self.terms if last or term.when != "step"}

    def accumulate(self, totals: dict, parts: dict) -> dict:
        """The step's parts so far with one micro-step's: "micro" terms summed, the others its value."""
        summed = {term.name for term in self.terms if term.when == "micro"} & totals.keys()
        return totals | {name: totals[name] + v if name in summed else v for name, v in parts.items()}

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the parts: what is back-propagated and logged as `loss` (a micro-step sums
        the parts it has: "step" terms come only in the last)."""
        weights = {"contrastive": self.weight, **{term.name: term.weight for term in self.terms}}
        return sum(weights[name] * parts[name] for name in self.parts if name in parts)

    def state_dict(self) -> dict:
        """This rank's resume state of the objective (a checkpoint gathers every rank's)."""
        return {key: value for term in self.terms for key, value in term.state_dict().items()}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Every saved rank's state, in rank order (or one rank's)."""
        states = state if isinstance(state, list) else [state]
        for term in self.terms:
            term.load_state_dict(states)

    def close(self) -> None:
        for term in self.terms:
            term.close()


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective as the registry knows it: the module `pretrain/objectives/specs/<name>.py` holds it as
    `SPEC`."""

    name: str
    """The `loss.name` that chooses it (its module's name)."""
    models: str
    """The models it fits, in words (a mismatch error names those of the model's default)."""
    fits: Callable[[nn.Module], bool]
    """Whether a model can train with it."""
    fields: tuple[str, ...]
    """The `loss.*` keys it reads; a switch it does not read, turned on, is refused."""
    build: Callable[[LossConfig], Objective]
    """Its objective (without extra terms) from the `loss` section."""
    default: bool = False
    """The objective of every model it fits when `loss.name` is null (one per model)."""
    unread: dict[str, str] = field(default_factory=dict)
    """Why it does not read a `loss.*` switch, for that refusal (else: "does not read it")."""
