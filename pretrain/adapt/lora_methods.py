"""`pretrain adapt --method lora|glad`: LoRA (and GLAD's regulariser) trained end to end on pixels through the
shared loop, scored through the adapted text tower for any class names, saved as a merged open_clip export.

The objective is CLIP-LoRA's (Zanella & Ben Ayed 2024): cross-entropy of `logit_scale · cos(image, text)`
against the class prompts "a photo of a {c}." (one template), both towers adapted, so the text features are
recomputed every step and a class never trained on is scored through the same adapted text tower. When the
image tower carries no adapters (`towers=text`) its features are frozen and read from the run's cache instead.
Training images use the eval transform (no augmentation): every step is then a function of the plan's batch
and the step's generator only, which is what makes 2 ranks equal 1 and a resumed run equal an unbroken one.

GLAD under DDP: its term needs a second and third forward (at θ and θ + ε) and a gradient of a gradient, which
DDP's forward cannot host (DDP does not support `torch.autograd.grad`). The cross-entropy goes through the
DDP-wrapped model as usual; the term is computed on the unwrapped module with g and g_sam averaged over ranks
(the global batch's, as one process computes them), and each rank's term carries its share of R's gradient, so
the one backward through DDP, whose all-reduce averages every parameter's gradient, gives exactly one rank's
update on the same global batch: GLAD on 2 ranks equals 1 rank, as plain LoRA does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from pretrain.adapt import loop, lora
from pretrain.adapt.data import AdaptRun, LabelledImages, compute_features, load_pixels
from pretrain.adapt.glad import GLADConfig, glad_objective
from pretrain.parallel.distributed import all_reduce_mean, world
from pretrain.publish.export import preprocess_cfg

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FILE = "adapter.json"


@dataclass
class LoRAMethodConfig:
    """LoRA's settings for `pretrain adapt`: where the adapters go (`LoRAConfig`) and how they train. Defaults
    are CLIP-LoRA's: r 2, alpha 1, dropout 0.25 on q, k, v of every block of both towers; AdamW lr 2e-4,
    weight decay 0.01, batch 32, cosine schedule, 500 × K steps for K shots."""

    rank: int = 2
    """r, the rank of each update B·A."""
    alpha: float = 1.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.25
    """Dropout on the LoRA path's input features (a mask over A's columns per forward), training only."""
    targets: tuple[str, ...] = ("q", "k", "v")
    """Matrices of each block: q, k, v, out, mlp (`targets=q,v` or `targets=[q,v]`)."""
    towers: str = "both"
    """image, text or both encoders; `text` alone trains on cached frozen image features."""
    layers: tuple[int, ...] | None = None
    """Block indices to adapt (negative from the end); None: every block."""
    lr: float = 2e-4
    """AdamW peak learning rate (cosine to 0, no warm-up)."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay on the LoRA matrices."""
    batch_size: int = 32
    """Global batch (capped at the number of shots)."""
    steps: int | None = None
    """Optimizer steps; None: `iters_per_shot` × K. 0 trains nothing (the checkpoint's own outputs)."""
    iters_per_shot: int = 500
    """CLIP-LoRA's `n_iters`: steps per shot when `steps` is None."""
    template: str = "a photo of a {c}."
    """The class prompt (`{c}`: the class name), in training and scoring."""
    checkpoint_every: int = 0
    """Resumable checkpoint every N steps (0: at the end only)."""

    def __post_init__(self) -> None:
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if isinstance(self.layers, int):
            self.layers = (self.layers,)
        if self.layers is not None and not all(type(i) is int for i in self.layers):
            raise ValueError(f"layers: block indices (whole numbers) or null, got {self.layers!r}")
        self.lora_config()  # validates rank, alpha, dropout, targets, towers, layers (ValueError naming the field)
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"steps: must be a whole number at least 0 (or null), got {self.steps!r}")
        for name in ("batch_size", "iters_per_shot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be at least 0, got {getattr(self, name)}")
        if "{c}" not in self.template:
            raise ValueError(f"template: must contain {{c}} (the class name), got {self.template!r}")

    def lora_config(self) -> lora.LoRAConfig:
        return lora.LoRAConfig(self.rank, self.alpha, self.dropout, self.targets, self.towers, self.layers)

    def steps_for(self, shots: int) -> int:
        return self.steps if self.steps is not None else self.iters_per_shot * shots

    def loop_config(self, steps: int, seed: int) -> loop.LoopConfig:
        return loop.LoopConfig(
            steps=steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            optimizer="adamw", schedule="cosine", warmup=0, checkpoint_every=self.checkpoint_every, seed=seed,
        )  # fmt: skip


@dataclass
class GLADMethodConfig(LoRAMethodConfig):
    """LoRA's settings plus GLAD's regulariser (pretrain/adapt/glad.py: R = λ · (1 − cos(g, g_sam)), this
    project's reconstruction from the paper's abstract and Fig. 1; its equations could not be read)."""

    rho: float = 0.05
    """ρ, the radius of SAM's ascent step (SAM's default; the paper's value is unknown here)."""
    weight: float = 1.0
    """λ, the weight of R in the loss (this project's choice; the paper's value is unknown here)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.glad()

    def glad(self) -> GLADConfig:
        return GLADConfig(self.rho, self.weight)


def image_tower_adapted(cfg: LoRAMethodConfig) -> bool:
    return cfg.towers in ("image", "both")


def encode_classes(
    model: nn.Module, tokenizer, classnames: Sequence[str], template: str, device
) -> torch.Tensor:
    """L2-normalised text features `[C, dim]` of the class prompts."""
    tokens = tokenizer([template.replace("{c}", name) for name in classnames]).to(device)
    return F.normalize(model.encode_text(tokens), dim=-1)


def _outputs(out) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(image features, text features, exp(logit scale)) of an open_clip forward (a dict or a tuple)."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


@dataclass
class ClassPrompts:
    """What a LoRA step scores: the training inputs (pixels, or frozen image features when the image tower has
    no adapters), their labels, and the tokenized class prompts."""

    inputs: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor
    pixels: bool

    def loss(self, model: nn.Module, indices: torch.Tensor) -> torch.Tensor:
        """CLIP-LoRA's loss on the samples at `indices`: one forward of `model` (DDP-wrapped or not)."""
        inputs = self.inputs[indices]
        image, text, scale = _outputs(model(inputs if self.pixels else None, self.tokens))
        image = image if self.pixels else inputs
        return F.cross_entropy(scale * image @ text.T, self.labels[indices])


def seed_dropout(module: nn.Module, generator: torch.Generator, device: torch.device) -> None:
    """Point every LoRA dropout at one generator seeded alike on every rank: rank 0's draw from the step's
    generator, broadcast (1 rank draws the same), so all ranks drop the same columns as one rank would."""
    seed = torch.randint(0, 2**62, (1,), generator=generator).to(device)
    if world()[1] > 1:
        torch.distributed.broadcast(seed, 0)
    shared = torch.Generator().manual_seed(int(seed.item()))
    for _, _, update in lora.lora_updates(module):
        update.generator = shared


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def step_loss(task: ClassPrompts, device: torch.device, glad: GLADConfig | None) -> loop.LossFn:
    """The shared loop's loss: CLIP-LoRA's cross-entropy through `model` (plus GLAD's term when given)."""

    def loss(model: nn.Module, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seed_dropout(unwrap(model), generator, device)
        value = task.loss(model, indices)
        if glad is None:
            return value
        average = all_reduce_mean if world()[1] > 1 else None
        _, term = glad_objective(unwrap(model), indices, task.loss, glad, average=average)
        return value + term

    return loss


@dataclass
class LoRAAdapted:
    """A LoRA-adapted model (adapters in place) that scores any class names through its text tower."""

    model: nn.Module
    run: AdaptRun
    cfg: LoRAMethodConfig
    method: str
    seen: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)
    """Adapted image features by (root, split, key): scoring a set, then its base and novel halves, encodes
    each image once."""

    @property
    def trainable_params(self) -> int:
        return lora.count_lora_parameters(self.model)

    def image_features(self, images: LabelledImages) -> torch.Tensor:
        """Normalised features of `images` through the adapted image tower (eval mode), in keys order."""
        ids = [(images.root, images.split, key) for key in images.keys]
        missing = [i for i, name in enumerate(ids) if name not in self.seen]
        if missing:
            part = images.subset(missing)
            found = compute_features(self.model, part, self.run.bundle.preprocess_val, self.run.device)
            self.seen.update(zip((ids[i] for i in missing), found))
        return torch.stack([self.seen[name] for name in ids])

    @torch.no_grad()
    def logits(self, images: LabelledImages, classnames: Sequence[str]) -> torch.Tensor:
        """`logit_scale · cos(image, prompt)` for each image (in `images.keys` order) and class."""
        self.model.eval()
        bundle = self.run.bundle
        text = encode_classes(self.model, bundle.tokenizer, classnames, self.cfg.template, self.run.device)
        if image_tower_adapted(self.cfg):
            features = self.image_features(images)
        else:
            features = self.run.features(images)
        return (self.model.logit_scale.exp() * features.to(text.device) @ text.T).float().cpu()

    def save(self, folder: Path) -> None:
        """The merged model as an export (`open_clip_config.json`, `open_clip_model.safetensors`, README.md:
        `pretrain eval --checkpoint` and open_clip's `local-dir:` load it) plus the adapter alone
        (`adapter.safetensors`: `lora_state_dict`; `adapter.json`: method, checkpoint, settings)."""
        folder.mkdir(parents=True, exist_ok=True)
        bundle = self.run.bundle
        config = {"model_cfg": bundle.model_cfg, "preprocess_cfg": preprocess_cfg(self.model)}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(merged_state_dict(self.model), str(folder / WEIGHTS_FILE))
        if hasattr(bundle.tokenizer, "save_pretrained"):  # HF tokenizers; open_clip's BPE needs no files
            bundle.tokenizer.save_pretrained(str(folder))
        adapter = {k: v.detach().contiguous().cpu() for k, v in lora.lora_state_dict(self.model).items()}
        save_file(adapter, str(folder / ADAPTER_WEIGHTS))
        info = {"method": self.method, "checkpoint": self.run.checkpoint, "model": bundle.name,
                "classnames": list(self.run.classnames), "config": asdict(self.cfg)}  # fmt: skip
        (folder / ADAPTER_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (folder / "README.md").write_text(readme(self.method, self.run.checkpoint, self.cfg))


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What `lora.merge_lora` leaves (W + scale · B·A under the base model's keys), without changing `model`:
    merging a deep copy would not do, since removing a parametrization edits the class the copy shares."""
    was_training = model.training
    model.eval()  # no dropout mask in the folded weights
    try:
        state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
        for prefix, module in model.named_modules():
            if parametrize.is_parametrized(module):
                for name in module.parametrizations:
                    state[f"{prefix}.{name}" if prefix else name] = getattr(module, name)
    finally:
        model.train(was_training)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def readme(method: str, checkpoint: str, cfg: LoRAMethodConfig) -> str:
    return (
        f"# {method} adaptation of {checkpoint}\n\nLoRA updates (rank {cfg.rank}, alpha {cfg.alpha}, "
        f"targets {', '.join(cfg.targets)}, towers {cfg.towers}) merged into the weights: a plain open_clip "
        "model (`open_clip.create_model_and_transforms('local-dir:THIS_FOLDER')`). The adapter alone is "
        f"`{ADAPTER_WEIGHTS}`, its settings `{ADAPTER_FILE}`. Written by `pretrain adapt` (docs/adaptation.md).\n"
    )


def train_inputs(run: AdaptRun, cfg: LoRAMethodConfig) -> tuple[torch.Tensor, bool]:
    """Pixels of the shots (eval transform) when the image tower trains, else their frozen features."""
    if image_tower_adapted(cfg):
        return load_pixels(run.train, run.bundle.preprocess_val).to(run.device), True
    return run.features(run.train).to(run.device), False


def train_lora(run: AdaptRun, cfg: LoRAMethodConfig, glad: GLADConfig | None, method: str) -> LoRAAdapted:
    """Adapters on the run's model (A seeded by `run.seed`), trained on the shots through the shared loop."""
    model = run.bundle.model
    inputs, pixels = train_inputs(run, cfg)  # before the adapters: frozen features are the checkpoint's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        lora.apply_lora(model, cfg.lora_config())
    tokens = run.bundle.tokenizer([cfg.template.replace("{c}", c) for c in run.classnames]).to(run.device)
    task = ClassPrompts(inputs, torch.tensor(run.train.labels, device=run.device), tokens, pixels)
    shots = math.ceil(len(run.train.keys) / len(run.classnames))
    steps = cfg.steps_for(shots)
    if steps > 0:
        model.train()
        loop.train(model, step_loss(task, run.device, glad), len(task.labels), cfg.loop_config(steps, run.seed),
                   run.output)  # fmt: skip
    model.eval()
    return LoRAAdapted(model, run, cfg, method)


def fit(run: AdaptRun, cfg: LoRAMethodConfig) -> LoRAAdapted:
    """LoRA (CLIP-LoRA's setting) on the run's shots."""
    return train_lora(run, cfg, None, "lora")


def fit_glad(run: AdaptRun, cfg: GLADMethodConfig) -> LoRAAdapted:
    """LoRA with GLAD's gradient regulariser on the run's shots."""
    return train_lora(run, cfg, cfg.glad(), "glad")


__all__ = ["GLADMethodConfig", "LoRAAdapted", "LoRAMethodConfig", "fit", "fit_glad"]
