"""CoOp and PRE as `pretrain adapt` methods: the prompt learners of `coop.py` and `pre.py` trained by the shared
loop (`loop.train`: DDP over the learner's trainable parameters, checkpoints, exact resume) on the run's cached
frozen image features, and saved as their prompt state plus what rebuilds the classifier.

The papers' schedule: SGD (momentum 0.9, weight decay 5e-4), `warmup_epochs` at the constant `warmup_lr`
(1e-5), then cosine to 0 over the remaining steps; an epoch is `ceil(N / batch)` loop steps over the N shots.
A unified context scores any class names (base-to-novel, cross-dataset); a class-specific one only its
training classes (`logits` returns None for others, so the command reports null there).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pretrain.adapt import loop
from pretrain.adapt.coop import CoOpConfig, PromptLearner, build_coop, load_prompt_state, prompt_state
from pretrain.adapt.data import AdaptRun, LabelledImages
from pretrain.adapt.pre import PREConfig, build_pre

PROMPT_FILE = "prompt_state.safetensors"
ADAPTER_FILE = "adapter.json"
BUILDERS: dict[str, tuple[type, Callable[..., PromptLearner]]] = {
    "coop": (CoOpConfig, build_coop),
    "pre": (PREConfig, build_pre),
}
"""Method name -> (config class, learner factory)."""


def loop_config(cfg: CoOpConfig, labels: Sequence[int], seed: int) -> loop.LoopConfig:
    """The shared loop's settings for `cfg` on shots with these labels (K: the smallest class's count, which
    picks the paper's epochs when `epochs` is null)."""
    samples, shots = len(labels), min(Counter(labels).values())
    per_epoch = math.ceil(samples / min(cfg.batch_size, samples))
    return loop.LoopConfig(
        steps=cfg.steps_for(samples, shots), batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, optimizer="sgd", momentum=cfg.momentum, schedule="cosine",
        warmup=cfg.warmup_epochs * per_epoch, warmup_lr=cfg.warmup_lr, checkpoint_every=cfg.checkpoint_every,
        seed=seed,
    )  # fmt: skip


def build_learner(method: str, model, tokenizer, classnames: Sequence[str], cfg: CoOpConfig, seed: int):
    """The method's learner, its initial state drawn from `seed` (the random context from a generator, PRE's
    LSTM from torch's seeded RNG): every rank and a rebuild start from the same values."""
    torch.manual_seed(seed)
    build = BUILDERS[method][1]
    return build(model, tokenizer, list(classnames), cfg, torch.Generator().manual_seed(seed))


def train_learner(learner: PromptLearner, features: torch.Tensor, labels: torch.Tensor,
                  cfg: loop.LoopConfig, output: Path | None) -> None:  # fmt: skip
    """Cross-entropy of the learner's logits on the features at each step's indices, through the shared loop."""

    def loss(model: torch.nn.Module, indices: torch.Tensor, _: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(features[indices]), labels[indices])

    learner.train()
    loop.train(learner, loss, len(features), cfg, output)
    learner.eval()


@dataclass
class PromptAdapter:
    """A trained prompt learner over the frozen model of the checkpoint it came from."""

    method: str
    learner: PromptLearner
    cfg: CoOpConfig
    checkpoint: str
    features: Callable[[LabelledImages], torch.Tensor]
    """Frozen, normalised image features of labelled images (the run's cache)."""

    @property
    def trainable_params(self) -> int:
        return loop.count_trainable(self.learner)

    @torch.no_grad()
    def logits(self, images: LabelledImages, classnames: Sequence[str]) -> torch.Tensor | None:
        """logit_scale * cos(image, class text feature) over `classnames`; None for names a class-specific
        context was not trained on."""
        if self.cfg.class_specific and list(classnames) != self.learner.classnames:
            return None
        self.learner.eval()
        features = F.normalize(self.features(images).to(self.learner.ctx.device), dim=-1)
        classifier = self.learner.classifier(classnames)
        return (self.learner.clip.logit_scale.exp() * features @ classifier).cpu()

    def save(self, folder: Path) -> None:
        """`prompt_state.safetensors` (the trained tensors: `ctx`, PRE's `encoder.*`) and `adapter.json` (the
        method, the checkpoint, the class names in order, the config): `load_prompt_adapter` rebuilds the
        classifier from them."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.cpu().contiguous() for name, t in prompt_state(self.learner).items()}
        save_file(tensors, str(folder / PROMPT_FILE))
        info = {"method": self.method, "checkpoint": self.checkpoint, "classnames": self.learner.classnames,
                "config": asdict(self.cfg)}  # fmt: skip
        (folder / ADAPTER_FILE).write_text(json.dumps(info, indent=2) + "\n")


def fit(method: str, run: AdaptRun, cfg: CoOpConfig) -> PromptAdapter:
    """Train `method`'s prompts on the run's shots (its cached features), resuming from its checkpoints."""
    bundle = run.bundle
    learner = build_learner(method, bundle.model, bundle.tokenizer, run.classnames, cfg, run.seed)
    features = run.features(run.train).to(run.device)
    labels = torch.tensor(run.train.labels, device=run.device)
    if cfg.epochs != 0:
        train_learner(learner, features, labels, loop_config(cfg, run.train.labels, run.seed), run.output)
    learner.eval()
    return PromptAdapter(method, learner, cfg, run.checkpoint, run.features)


def fit_coop(run: AdaptRun, cfg: CoOpConfig) -> PromptAdapter:
    """CoOp (`--method coop`)."""
    return fit("coop", run, cfg)


def fit_pre(run: AdaptRun, cfg: PREConfig) -> PromptAdapter:
    """PRE (`--method pre`)."""
    return fit("pre", run, cfg)


def load_prompt_adapter(
    folder: Path, bundle, features: Callable[[LabelledImages], torch.Tensor]
) -> PromptAdapter:
    """The adapter `PromptAdapter.save` wrote to `folder`, on `bundle` (the checkpoint `adapter.json` names,
    loaded by the caller) with `features` for the images to score."""
    info = json.loads((Path(folder) / ADAPTER_FILE).read_text())
    config_class = BUILDERS[info["method"]][0]
    cfg = config_class(**info["config"])
    learner = build_learner(info["method"], bundle.model, bundle.tokenizer, info["classnames"], cfg, 0)
    load_prompt_state(learner, load_file(str(Path(folder) / PROMPT_FILE)))
    learner.eval()
    return PromptAdapter(info["method"], learner, cfg, info["checkpoint"], features)
