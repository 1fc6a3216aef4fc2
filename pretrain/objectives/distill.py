"""Continued pretraining without forgetting: the `distill` section's terms, composed into the objective.

Two terms, each a logged part weighted by `distill.weight`:

- `distill` (with `distill.model`): open_clip's `DistillClipLoss` term. A frozen teacher encodes the same
  image-text batch; for both directions, the cross-entropy of the student's logits against the softmax of the
  teacher's, averaged over rows and over the two directions. As in open_clip, the logits of each model are
  its own scale times its features against the gathered features of the global batch (the teacher's gathered
  like the student's); each rank takes its local rows (open_clip's `local_loss`), so the mean over ranks
  (what the strategies' gradient mean gives) is the term over the global batch.
- `zscl` (with `distill.reference_data` + `distill.reference_texts`): ZSCL's reference-set distillation
  (Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language
  Models", ICCV 2023; the `distillation` helper and the ZSCL branch of `mtil/src/models/finetune.py` in
  github.com/Thunderbeee/ZSCL). Each step a batch of reference images (no labels, no matched captions) is
  encoded by the student and by the initial model; both are scored against the initial model's features of
  the reference phrases (encoded once), scaled by the initial model's logit scale (ZSCL keeps the logit
  scale frozen at its initial value) and divided by the temperature T; the term is
  T^2 x mean over images of KL(initial || student) of the two softmax distributions over phrases.
  ZSCL's code computes the cross-entropy instead; the two differ by the initial model's entropy, a constant
  with no gradient, so the KL is used here: it reads 0 where the student still agrees with the initial model.

The teacher (`distill.model`, or for ZSCL without one a frozen copy of the starting weights) gets no gradient,
runs in eval mode, holds no optimizer state, and is sharded like the student under FSDP (replicated under
DDP and DeepSpeed).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.config import Config, ConfigError, DistillConfig, ModelConfig
from pretrain.models.build import (
    ModelBundle,
    build_model,
    context_length,
    image_size,
    load_trained,
    use_dict_outputs,
)
from pretrain.objectives.objective import MicroStep, Term
from pretrain.parallel.base import Strategy
from pretrain.parallel.distributed import DistInfo, all_gather_with_grad

TEXT_CHUNK = 256
"""Reference phrases encoded per teacher forward pass."""


def distill_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """open_clip's `DistillClipLoss.dist_loss`: the student's cross-entropy against the teacher's softmax,
    summed over columns, averaged over rows."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


def teacher_distill_term(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    teacher_scale: torch.Tensor,
) -> torch.Tensor:
    """The distillation part of `DistillClipLoss` for this rank's rows against every rank's columns (the
    student's gathered with gradient, the teacher's without)."""
    all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
    with torch.no_grad():
        teacher_all_image, teacher_all_text = (all_gather_with_grad(t) for t in (teacher_image, teacher_text))
    per_image = distill_cross_entropy(
        teacher_scale * teacher_image @ teacher_all_text.T, scale * image @ all_text.T
    )
    per_text = distill_cross_entropy(
        teacher_scale * teacher_text @ teacher_all_image.T, scale * text @ all_image.T
    )
    return (per_image + per_text) / 2


def zscl_term(
    image: torch.Tensor,
    initial_image: torch.Tensor,
    reference_text: torch.Tensor,
    scale: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """ZSCL's image-to-reference-text distillation: T^2 x mean over this rank's images of
    KL(softmax(initial / T) || softmax(student / T)), the logits being `scale` x image @ phrases."""
    student = F.log_softmax(scale * image @ reference_text.T / temperature, dim=1)
    initial = F.log_softmax(scale * initial_image @ reference_text.T / temperature, dim=1)
    kl = (initial.exp() * (initial - student)).sum(dim=1).mean(dim=0)
    return kl * temperature**2


def read_reference_texts(path: str) -> list[str]:
    """The non-empty lines of `distill.reference_texts`; a missing, unreadable or empty file is a ConfigError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"distill.reference_texts: file not found: {path}")
    try:
        texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ConfigError(f"distill.reference_texts: {path} is not UTF-8 text ({e.reason})") from None
    if not texts:
        raise ConfigError(f"distill.reference_texts: {path} holds no phrases (one per line expected)")
    return texts


def _load_teacher(cfg: DistillConfig) -> ModelBundle:
    """The teacher of `distill.model`: an export/checkpoint/run directory, or an open_clip name (+ tag/file);
    model-building errors are re-keyed to the `distill` section."""
    try:
        if Path(cfg.model).exists() and not cfg.model.endswith(".json"):
            if cfg.pretrained is not None:
                raise ConfigError(
                    f"distill.pretrained: {cfg.pretrained} applies to an open_clip name, but distill.model="
                    f"{cfg.model} is an export or checkpoint that holds its weights"
                )
            return load_trained(cfg.model)
        return build_model(ModelConfig(name=cfg.model, pretrained=cfg.pretrained))
    except ConfigError as e:
        text = (
            str(e)
            .replace("model.name:", "distill.model:", 1)
            .replace("model.pretrained:", "distill.pretrained:", 1)
        )
        raise ConfigError(text) from None
    except FileNotFoundError as e:
        raise ConfigError(f"distill.model: {e}") from None


def _embed_dim(model: torch.nn.Module, size: int, device: torch.device) -> int:
    """The width of the model's image features (one blank image through its forward)."""
    with torch.no_grad():
        return model(torch.zeros(1, 3, size, size, device=device), None)["image_features"].shape[-1]


def _check_fits(cfg: DistillConfig, teacher: torch.nn.Module, student: torch.nn.Module, device) -> None:
    """The teacher sees the student's batches (same image size and context length); ZSCL scores the
    student's image features against the teacher's phrase features (same embedding width)."""
    key, value = "distill.model", cfg.model
    if image_size(teacher) != image_size(student):
        raise ConfigError(
            f"{key}: {value} takes {image_size(teacher)}px images, the student {image_size(student)}px "
            "(the teacher encodes the student's batches)"
        )
    if context_length(teacher) != context_length(student):
        raise ConfigError(
            f"{key}: {value} has context length {context_length(teacher)}, the student "
            f"{context_length(student)} (the teacher encodes the student's tokens)"
        )
    if cfg.zscl:
        size = image_size(student)
        ours, theirs = _embed_dim(student, size, device), _embed_dim(teacher, size, device)
        if ours != theirs:
            raise ConfigError(
                f"{key}: {value} has embed dim {theirs}, the student {ours}; ZSCL scores the student's image "
                "features against the teacher's reference-text features, so they must match"
            )


class Teacher:
    """A frozen model run forward only: no grad, eval mode, autocast like the student."""

    def __init__(self, bundle: ModelBundle, strategy: Strategy, device: torch.device, bf16: bool) -> None:
        self.bundle, self.device, self.bf16 = bundle, device, bf16
        self.module = strategy.wrap_frozen(bundle.model, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | None, texts: torch.Tensor | None) -> dict:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(images, texts)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 features of `texts` (in chunks) and the teacher's logit scale."""
        chunks, scale = [], None
        for start in range(0, len(texts), TEXT_CHUNK):
            tokens = self.bundle.tokenizer(texts[start : start + TEXT_CHUNK]).to(self.device)
            out = self(None, tokens)
            chunks.append(out["text_features"].float())
            scale = out["logit_scale"].float()
        return torch.cat(chunks), scale


def build_reference_source(cfg: Config, bundle: ModelBundle, info: DistInfo, device: torch.device):
    """ZSCL's reference images for this rank: `distill.reference_batch_size` per step, split over ranks like
    the training data, with the model's eval transform (no augmentation, as ZSCL), its own resumable stream."""
    from pretrain.data import build_source

    dcfg = cfg.distill
    data = dataclasses.replace(
        cfg.data, train=dcfg.reference_data, train_weights=None, train_upsampling_factors=None, sampling="epoch",
        partitions=None,
    )  # fmt: skip
    train = dataclasses.replace(
        cfg.train, seed=cfg.train.seed + 1, batch_size=dcfg.reference_batch_size, accum_steps=1
    )
    ref_cfg = dataclasses.replace(cfg, data=data, train=train)
    # per rank: on another number of ranks its partitions continue where they stood, with a new global batch
    return build_source(
        ref_cfg,
        dataclasses.replace(bundle, preprocess_train=bundle.preprocess_val),
        info,
        device,
        exact_batch=False,
    )


class Distill(Term):
    """open_clip's `DistillClipLoss` term against the teacher's features of the same micro-batches."""

    name = "distill"

    def __init__(self, weight: float, teacher: Teacher) -> None:
        super().__init__(weight)
        self.teacher = teacher

    def begin_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The teacher's features of the step's micro-batches, in step order (as the accumulated features)."""
        outs = [self.teacher(images, texts) for images, texts in micro]
        image = torch.cat([o["image_features"].float() for o in outs])
        text = torch.cat([o["text_features"].float() for o in outs])
        self._teacher_features = (image, text, outs[0]["logit_scale"].float())

    def __call__(self, step: MicroStep) -> torch.Tensor:
        image, text, scale, _ = step.features
        return teacher_distill_term(image, text, scale, *self._teacher_features)


class Zscl(Term):
    """ZSCL's reference-set term: each step, a batch of reference images through the student and the initial
    model, scored against the initial model's features of the reference phrases (encoded once)."""

    name, when = "zscl", "step"

    def __init__(self, cfg: DistillConfig, teacher: Teacher, reference) -> None:
        super().__init__(cfg.weight)
        self.teacher, self.reference, self.temperature = teacher, reference, cfg.temperature
        self.texts, self.scale = teacher.encode_texts(read_reference_texts(cfg.reference_texts))

    def __call__(self, step: MicroStep) -> torch.Tensor:
        images = self.reference.next_batch()[0].to(self.teacher.device, non_blocking=True)
        initial = self.teacher(images, None)["image_features"].float()
        return zscl_term(step.encode_images(images), initial, self.texts, self.scale, self.temperature)

    def state_dict(self) -> dict:
        return {"reference": self.reference.state_dict()}

    def load_state_dict(self, states: list[dict]) -> None:
        self.reference.load_state_dict([state["reference"] for state in states])

    def close(self) -> None:
        self.reference.close()


def build_terms(
    cfg: Config, student: ModelBundle, strategy: Strategy, info: DistInfo, device: torch.device
) -> list[Term]:
    """The terms of `cfg.distill`, built before the student is wrapped: their frozen model is `distill.model`,
    or for ZSCL without one a copy of the student's starting weights (what ZSCL calls the initial model). The
    reference texts are checked first, so a bad file fails before any model is loaded."""
    dcfg = cfg.distill
    if not dcfg.enabled:
        return []
    if dcfg.zscl:
        read_reference_texts(dcfg.reference_texts)
    if dcfg.model is None:
        bundle = dataclasses.replace(student, model=copy.deepcopy(student.model))
    else:
        bundle = _load_teacher(dcfg)
        bundle.model.to(device)
        use_dict_outputs(bundle.model)
        _check_fits(dcfg, bundle.model, student.model, device)
    teacher = Teacher(bundle, strategy, device, cfg.train.precision == "bf16")
    terms: list[Term] = [Distill(dcfg.weight, teacher)] if dcfg.model is not None else []
    if dcfg.zscl:
        terms.append(Zscl(dcfg, teacher, build_reference_source(cfg, bundle, info, device)))
    return terms
