"""The sections of the run config: one dataclass per component, each checking its own values.

``pretrain/config.py`` assembles them into ``Config`` and loads YAML and overrides; import from there. Each
field's docstring (the string under it) is what ``pretrain config --describe`` prints.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from pretrain.objectives.specs import objective_names
from webshards.evalset import TASKS as EVAL_TASKS

PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("ddp", "fsdp", "deepspeed")
SECRET_WORDS = ("key", "token", "secret", "password")
NOT_SECRETS = ("text_key", "image_key", "table_image_key", "table_caption_key")
"""Keys with a secret word in their name that hold no secret: they name a sample's members or a table's columns."""
SCHEDULES = ("cosine", "const", "const_cooldown")

log = logging.getLogger("pretrain")


class ConfigError(ValueError):
    """A config problem, described in one line that names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def close_matches(word: str, candidates: list[str], n: int = 1) -> str:
    """A ` (did you mean 'x'?)` hint naming up to `n` candidates close to `word` (any case), or ''."""
    by_lower = {c.lower(): c for c in candidates}
    close = [by_lower[c] for c in difflib.get_close_matches(word.lower(), list(by_lower), n=n)]
    if not close:
        return ""
    quoted = [f"'{c}'" for c in close]
    names = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f" (did you mean {names}?)"


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; outputs go to `{dir}/{name}/`."""
    dir: str = "runs"
    """Parent folder of run directories."""
    license: str | None = None
    """License of the trained weights for the exported model card, a Hub license id (e.g. `apache-2.0`,
    `other`); null: the card names none."""
    datasets: list[str] = field(default_factory=list)
    """Names of the training data sets for the model card's `datasets` (Hub dataset ids); empty: none."""


@dataclass
class ModelConfig:
    name: str = "tiny-clip"
    """An open_clip model name (e.g. ViT-B-32), a config in configs/models/, or a path to a JSON config."""
    pretrained: str | None = None
    """Weights to start from: an open_clip pretrained tag, a weights file (open_clip_train `epoch_N.pt`,
    `.safetensors`, a state dict), an export folder, or a checkpoint folder / run directory of ours (its
    model weights only); null: random init."""
    pretrained_image: bool = False
    """Start a timm image tower from timm's ImageNet weights (open_clip's `pretrained_image`; downloaded by
    timm), when `pretrained` gives no weights; other towers ignore it."""

    # Locked towers (continued pretraining): open_clip's lock_image_tower / lock_text_tower.
    lock_image: bool = False
    """Freeze the image tower (LiT): no gradients, no optimizer state, no gradient all-reduce."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave the last N layer groups of the image tower trainable (open_clip's groups)."""
    lock_image_freeze_bn_stats: bool = False
    """With lock_image: freeze BatchNorm running stats of the locked layers (open_clip); a fully locked
    image tower is also kept in eval mode."""
    lock_text: bool = False
    """Freeze the text tower (embeddings, blocks, final norm, projection)."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: leave the last N layer groups of the text tower trainable (open_clip's groups)."""
    lock_text_freeze_layer_norm: bool = True
    """With lock_text: keep LayerNorms of locked layers frozen too; false is only supported by Hugging Face
    text towers (open_clip's own towers lock their LayerNorms with the rest)."""

    patch_dropout: float = 0.0
    """Fraction of image patch tokens dropped in training (FLIP; open_clip's `force_patch_dropout`): 0 off.
    Eval and the exported model see all patches."""

    # open_clip's create_model overrides (open_clip_train's --force-*); checkpoints and exports keep them.
    force_quick_gelu: bool = False
    """QuickGELU (x * sigmoid(1.702 x), OpenAI CLIP's activation) in place of the config's GELU (open_clip's
    `force_quick_gelu`): for weights trained with it."""
    force_custom_text: bool = False
    """Build the text tower as its own module (open_clip's CustomTextCLIP, weights under `text.`) even where
    the config has the built-in one (open_clip's `force_custom_text`)."""
    force_image_size: int | None = None
    """Image size S (S x S) instead of the config's `vision_cfg.image_size` (open_clip's `force_image_size`;
    square only, as the data pipeline is); the transforms and the export follow it. null: the config's."""
    force_context_length: int | None = None
    """Text context length instead of the config's (open_clip's `force_context_length`); the tokenizer and
    the export follow it. null: the config's."""
    # open_clip's preprocessing overrides (open_clip_train's --image-*): the transforms and the export's
    # preprocess_cfg follow them.
    image_mean: list[float] | None = None
    """Per-channel normalisation mean instead of the model's (open_clip's `image_mean`); null: the model's."""
    image_std: list[float] | None = None
    """Per-channel normalisation std instead of the model's (open_clip's `image_std`); null: the model's."""
    image_interpolation: str | None = None
    """Resize interpolation instead of the model's: bicubic, bilinear or random (open_clip's
    `image_interpolation`); null: the model's."""
    image_resize_mode: str | None = None
    """Eval resize mode instead of the model's: shortest, longest or squash (open_clip's `image_resize_mode`;
    training crops as before); null: the model's."""

    def __post_init__(self) -> None:
        _check(
            0 <= self.patch_dropout < 1, "model.patch_dropout", f"must be in [0, 1), got {self.patch_dropout}"
        )
        for name in ("force_image_size", "force_context_length"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"model.{name}", f"must be > 0 or null, got {value}")
        self._check_preprocess()
        for tower, key in (("image", "lock_image_unlocked_groups"), ("text", "lock_text_unlocked_layers")):
            value = getattr(self, key)
            _check(value >= 0, f"model.{key}", f"must be >= 0, got {value}")
            _check(
                value == 0 or getattr(self, f"lock_{tower}"),
                f"model.{key}",
                f"only applies to a locked tower; set model.lock_{tower}=true (got {key}={value})",
            )

    def _check_preprocess(self) -> None:
        """The preprocessing overrides: open_clip_train's choices, one or three channels."""
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            _check(
                value is None or len(value) in (1, 3), f"model.{name}", f"needs 1 or 3 values, got {value}"
            )
        _check(
            self.image_std is None or min(self.image_std) > 0,
            "model.image_std",
            f"must be > 0, got {self.image_std}",
        )
        for name, allowed in (
            ("image_interpolation", ("bicubic", "bilinear", "random")),
            ("image_resize_mode", ("shortest", "longest", "squash")),
        ):
            value = getattr(self, name)
            _check(
                value in (None, *allowed), f"model.{name}", f"must be one of {allowed} or null, got {value!r}"
            )


@dataclass
class AugConfig:
    """open_clip's `AugmentationCfg` (open_clip_train's `--aug-cfg`), same names and defaults: the training
    transform open_clip builds with it runs on the `cpu`, `device` and `nvjpeg` paths alike (docs/data.md).
    Settings open_clip would ignore with a warning are errors here, naming the key."""

    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    """RandomResizedCrop's range of the crop's area, as fractions of the image's: [min, max] in (0, 1]."""
    ratio: list[float] | None = None
    """Range of the crop's aspect ratio (w/h), [min, max] (timm's transform only: needs use_timm;
    null: [3/4, 4/3])."""
    color_jitter: list[float] | None = None
    """ColorJitter strengths [brightness, contrast, saturation, hue] (hue <= 0.5). open_clip's transform
    needs all four and color_jitter_prob; timm's (use_timm) jitters every image and also takes three."""
    re_prob: float | None = None
    """timm's RandomErasing: the chance an image gets erased rectangles of per-pixel noise, after
    normalisation (needs use_timm)."""
    re_count: int | None = None
    """RandomErasing: up to this many rectangles per erased image (needs re_prob; null: 1)."""
    use_timm: bool = False
    """Build the transform with timm's `create_transform` (RandomResizedCrop with ratio, ColorJitter,
    RandomErasing) instead of open_clip's own (RandomResizedCrop, jitter and grayscale with probabilities)."""
    color_jitter_prob: float | None = None
    """open_clip's transform: the chance of colour jitter per image (needs color_jitter, not use_timm)."""
    gray_scale_prob: float | None = None
    """open_clip's transform: the chance an image is made grayscale (3 channels; not with use_timm)."""

    def __post_init__(self) -> None:
        self._check_ranges()
        timm_only = {"ratio": self.ratio, "re_prob": self.re_prob, "re_count": self.re_count}
        for name, value in timm_only.items():
            _check(
                value is None or self.use_timm,
                f"data.aug.{name}",
                "open_clip uses it only with use_timm=true",
            )
        for name in ("color_jitter_prob", "gray_scale_prob"):
            _check(
                getattr(self, name) is None or not self.use_timm,
                f"data.aug.{name}",
                "timm's transform (use_timm=true) has no such setting; open_clip drops it",
            )
        _check(self.re_count is None or self.re_prob, "data.aug.re_count", "needs data.aug.re_prob")
        jitter, prob = self.color_jitter, self.color_jitter_prob
        _check(
            prob is None or jitter is not None, "data.aug.color_jitter_prob", "needs data.aug.color_jitter"
        )
        _check(
            jitter is None or self.use_timm or (prob is not None and len(jitter) == 4),
            "data.aug.color_jitter",
            "open_clip's transform takes 4 values [brightness, contrast, saturation, hue] with "
            "data.aug.color_jitter_prob (or set use_timm=true)",
        )

    def _check_ranges(self) -> None:
        for name, (lo, hi) in {"scale": (0, 1), "ratio": (0, float("inf"))}.items():
            value = getattr(self, name)
            _check(
                value is None or (len(value) == 2 and lo < value[0] <= value[1] <= hi),
                f"data.aug.{name}",
                f"must be [min, max] with {lo} < min <= max{f' <= {hi}' if hi == 1 else ''}, got {value}",
            )
        jitter = self.color_jitter
        _check(
            jitter is None
            or (len(jitter) in (3, 4) and min(jitter) >= 0 and (len(jitter) == 3 or jitter[3] <= 0.5)),
            "data.aug.color_jitter",
            f"must be 3 or 4 values >= 0 (hue <= 0.5), got {jitter}",
        )
        for name in ("re_prob", "color_jitter_prob", "gray_scale_prob"):
            value = getattr(self, name)
            _check(value is None or 0 <= value <= 1, f"data.aug.{name}", f"must be in [0, 1], got {value}")
        _check(
            self.re_count is None or self.re_count >= 1,
            "data.aug.re_count",
            f"must be >= 1, got {self.re_count}",
        )

    def to_open_clip(self) -> dict:
        """The settings as open_clip's `aug_cfg` (its `AugmentationCfg` fields; unset ones left out)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


@dataclass
class DataConfig:
    train: str = "synthetic"
    """Shard spec (brace-expanded, `::`-joined sources) or the word `synthetic`."""
    train_weights: list[float] | None = None
    """Sampling weight of each `::`-joined source (needs `sampling=resampled`)."""
    train_upsampling_factors: list[float] | None = None
    """open_clip's `--train-data-upsampling-factors`: a factor per `::` source that weighs each of its shards,
    so a source is drawn in proportion to factor x its shard count (`train_weights` sets the sources'
    proportions directly). Needs `sampling=resampled`; not with `train_weights`."""
    sampling: str = "epoch"
    """`epoch` (every shard once per epoch, split across ranks and workers) or `resampled` (shards drawn
    with replacement by weight, the LAION-5B recipe)."""
    partitions: int | None = None
    """Canonical partitions of the training stream, each with its own shards and shuffle; every step takes
    `global batch / partitions` samples from each, so the sample order does not depend on ranks or workers.
    Ranks x max(1, workers) must divide it. null: one per loader slot of the run's first start (a checkpoint
    keeps its number). Set it (e.g. 64) to resume on any topology that divides it."""
    shuffle_buffer: int = 1000
    """Samples per shuffle block of each partition (1: no sample shuffling)."""
    workers: int = 0
    """Data-loading worker processes per rank (0: load in the training process)."""
    prefetch: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = True
    """Pin host batches for faster copies to the GPU (ignored on CPU)."""
    decode: str = "cpu"
    """`cpu` (decode + model transform in workers), `device` (workers decode at reduced size; resize and
    normalise on the device) or `nvjpeg` (workers pass JPEG bytes; the GPU decodes)."""
    max_bad_fraction: float = 0.5
    """Stop when more than this fraction of the last `bad_window` samples of a partition were bad."""
    bad_window: int = 1000
    """Samples per partition over which `max_bad_fraction` is measured."""
    retries: int = 3
    """Retries (with exponential backoff) to open an http(s)://, pipe: or local shard before skipping it;
    s3:// requests are retried by the S3 client (AWS_MAX_ATTEMPTS, see docs/scaling.md)."""
    synthetic_classes: int = 16
    """Synthetic data: number of latent classes (images and texts of a class correlate, so loss falls)."""
    aug: AugConfig = field(default_factory=AugConfig)
    """Training augmentation: open_clip's `AugmentationCfg` settings (`data.aug.*`)."""
    text_key: str = "txt"
    """Where a sample's caption is: a tar member's extension (`txt`: the whole text is one caption, as
    img2dataset writes it), or `json:FIELD`, a field of its KEY.json; a field holding a list is several
    captions, one drawn per sample per epoch from the sample's seed. `;` separates alternatives tried in order
    (`txt;caption`, `json:a;b`: the first holding a caption wins), as open_clip's `--text-key` and
    `--json-text-key`."""
    image_key: str = "jpg;jpeg;png;webp"
    """Tar member extensions that may hold the image, `;`-separated; the first present is used (open_clip's
    webdataset reader: `jpg;png;jpeg;webp`)."""
    table_image_key: str = "filepath"
    """`data.train` a .csv/.tsv/.parquet/.jsonl table: the column of image paths (relative to the table's
    folder) or URLs (open_clip's `--csv-img-key`)."""
    table_caption_key: str = "title"
    """A table's caption column; a column of lists gives several captions (open_clip's `--csv-caption-key`)."""
    table_separator: str | None = None
    """A .csv/.tsv table's separator (open_clip's `--csv-separator`; `\\t` or `tab` for a tab); null: a tab if
    the header line has one (open_clip's default), else a comma."""
    table_samples_per_shard: int | None = None
    """A table's rows per shard when its shards are built; null: enough for 64 shards, at most 10000."""

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.image_key.split(";") if k.strip())

    def __post_init__(self) -> None:
        self._check_keys()
        _check(
            self.sampling in ("epoch", "resampled"),
            "data.sampling",
            f"must be epoch or resampled, got {self.sampling!r}",
        )
        _check(
            self.partitions is None or self.partitions > 0,
            "data.partitions",
            f"must be > 0 or null, got {self.partitions}",
        )
        _check(
            self.train_weights is None or self.sampling == "resampled",
            "data.train_weights",
            "needs data.sampling=resampled (epoch sampling reads every shard once and ignores weights)",
        )
        _check(
            self.train_upsampling_factors is None or self.sampling == "resampled",
            "data.train_upsampling_factors",
            "needs data.sampling=resampled (as open_clip's needs --dataset-resampled)",
        )
        _check(
            self.train_upsampling_factors is None or self.train_weights is None,
            "data.train_upsampling_factors",
            "give it or data.train_weights, not both (both set the sources' proportions)",
        )
        factors = self.train_upsampling_factors or [1.0]
        _check(
            min(factors) >= 0 and sum(factors) > 0,
            "data.train_upsampling_factors",
            f"must be >= 0 with a positive sum, got {factors}",
        )
        _check(
            self.decode in ("cpu", "device", "nvjpeg"),
            "data.decode",
            f"must be cpu, device or nvjpeg, got {self.decode!r}",
        )
        for name in ("workers", "retries"):
            _check(getattr(self, name) >= 0, f"data.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("shuffle_buffer", "prefetch", "bad_window", "synthetic_classes"):
            _check(getattr(self, name) > 0, f"data.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(0 < self.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in (0, 1]")

    def _check_keys(self) -> None:
        member, colon, fields = self.text_key.partition(":")
        names = fields.split(";") if colon else member.split(";")
        _check(
            all(name and name == name.strip() for name in names) and (not colon or member == "json"),
            "data.text_key",
            f"must be member extensions (txt, or txt;caption) or json:FIELD[;FIELD], got {self.text_key!r}",
        )
        _check(bool(self.image_keys), "data.image_key", f"names no extension: {self.image_key!r}")
        _check(
            self.table_samples_per_shard is None or self.table_samples_per_shard > 0,
            "data.table_samples_per_shard",
            f"must be > 0 or null, got {self.table_samples_per_shard}",
        )
        for name in ("table_image_key", "table_caption_key"):
            _check(bool(getattr(self, name)), f"data.{name}", "must name a column")
        if self.table_separator in ("\\t", "tab"):  # what a shell passes for a tab
            self.table_separator = "\t"
        _check(
            self.table_separator is None or len(self.table_separator) == 1,
            "data.table_separator",
            f"must be one character or null, got {self.table_separator!r}",
        )


def timm_optimizer_names() -> list[str]:
    """`timm/NAME` for every optimizer timm's factory builds (imports timm: only asked for a non-default)."""
    from timm.optim import list_optimizers

    return [f"timm/{name}" for name in list_optimizers()]


DEEPSPEED_TIMM_OPTIMIZERS = (
    "adam", "adamw", "nadam", "nadamw", "radam", "radamw", "adamax", "adabelief", "adan", "adanw", "laprop",
    "lion", "sgd", "momentum", "nesterov", "sgdw", "rmsprop", "rmsproptf", "adagrad", "adadelta",
)  # fmt: skip
"""timm optimizers whose update is elementwise: DeepSpeed ZeRO steps the optimizer on flat partitions of
many tensors, which changes the update of any optimizer that reads a whole tensor (LAMB/LARS trust ratios,
Adafactor's factored moments, the cautious variants' masks, Muon's orthogonalisation)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run in total."""
    batch_size: int = 16
    """Samples per rank per micro-step."""
    accum_steps: int = 1
    """Micro-steps per optimizer step; all accumulated samples are negatives for each other."""
    seed: int = 0
    """Seed of the model init, the synthetic data and the shard order."""
    precision: str = "fp32"
    """fp32 or bf16 (autocast; also on CPU)."""
    lr: float = 5e-4
    """Peak learning rate, reached after `warmup_steps` (image_lr / text_lr: the towers' own)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule (for a group of another base rate, scaled with it)."""
    warmup_steps: int = 10
    """Steps of linear warmup up to `lr`."""
    weight_decay: float = 0.2
    """Applied to weight matrices only; gains, biases and the logit scale get none."""
    beta1: float = 0.9
    """AdamW beta1 (a timm optimizer takes its betas from optimizer_kwargs)."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    weight_ensemble_every: int = 0
    """Weight ensembling (ZSCL's WE): every N steps fold the weights into a running average that starts
    from the initial weights (`pretrain export --weights ensemble` exports it); 0: off."""

    # Learning-rate schedule shapes (open_clip_train's scheduler.py); warmup comes first in each.
    schedule: str = "cosine"
    """cosine (down to min_lr), const (lr after warmup) or const_cooldown (lr, then a cooldown over the
    last cooldown_steps)."""
    cooldown_steps: int = 0
    """const_cooldown: steps of the final decay from lr to cooldown_end_lr."""
    cooldown_power: float = 1.0
    """const_cooldown: shape of the decay, (1 - progress) ** power (1: linear)."""
    cooldown_end_lr: float = 0.0
    """const_cooldown: the learning rate the cooldown decays towards."""
    compile: bool = False
    """torch.compile each transformer block (after activation checkpointing, before sharding) and the
    contrastive loss."""
    fused_adamw: str = "auto"
    """auto (fused AdamW when every trainable parameter is on CUDA, else torch's default), true or false."""

    # The optimizer and per-group rates (open_clip_train's --opt and --image/--text-layer-decay, EVA-CLIP's
    # --visual-lr/--text-lr): each group keeps its own base rate through warmup, schedule and resume.
    optimizer: str = "adamw"
    """adamw (torch's AdamW with beta1, beta2, eps), or timm/NAME for an optimizer of timm's factory
    (open_clip_train's --opt), e.g. timm/lamb, timm/lion, timm/adafactor, with timm's defaults for it."""
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    """timm/NAME only: keyword arguments of the optimizer over timm's defaults (open_clip_train's --opt-kwargs),
    e.g. {betas: [0.9, 0.99], eps: 1.0e-8, momentum: 0.9}."""
    wd_exclude: list[str] = field(default_factory=list)
    """Parameter-name patterns (fnmatch, full names, e.g. `*pos_embed*`, `visual.proj*`) that get no weight decay,
    on top of the default rule (gains, biases, norms, the logit scale): open_clip_train's --wd-exclude."""
    image_lr: float | None = None
    """Peak rate of the image tower (null: lr); the logit scale/bias and anything outside both towers keep lr."""
    text_lr: float | None = None
    """Peak rate of the text tower (null: lr); CoCa's text decoder is outside it and keeps lr."""
    image_layer_decay: float = 1.0
    """Layer-wise rate decay of the image tower (EVA-CLIP's --visual-ld): embeddings are layer 0, block i layer
    i+1, the head layer N+1; a layer's rate is image_lr x decay ** (N+1 - layer); a timm tower is numbered by
    its trunk's group_matcher. 1.0: off."""
    text_layer_decay: float = 1.0
    """Layer-wise rate decay of the text tower, numbered as image_layer_decay's (EVA-CLIP's --text-ld). 1.0: off."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accum_steps"):
            value = getattr(self, name)
            _check(value > 0, f"train.{name}", f"must be > 0, got {value}")
        _check(
            self.precision in PRECISIONS,
            "train.precision",
            f"must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _check(
            self.weight_ensemble_every >= 0,
            "train.weight_ensemble_every",
            f"must be >= 0 (0: off), got {self.weight_ensemble_every}",
        )
        _check(
            self.device in ("auto", "cpu", "cuda"),
            "train.device",
            f"must be auto, cpu or cuda, got {self.device!r}",
        )
        self._check_schedule()
        self._check_optimizer()
        self.fused_adamw = str(self.fused_adamw).lower()  # YAML and overrides make `true` a bool
        _check(
            self.fused_adamw in ("auto", "true", "false"),
            "train.fused_adamw",
            f"must be auto, true or false, got {self.fused_adamw!r}",
        )

    def _check_optimizer(self) -> None:
        """A known optimizer name (timm's list read only when one of its names is asked for), positive
        tower rates, layer decays in (0, 1]."""
        if self.optimizer != "adamw":
            choices = ["adamw", *timm_optimizer_names()]
            wrapped = self.optimizer.replace("timm/lookahead_", "timm/", 1)  # timm's Lookahead around one
            _check(
                wrapped in choices,
                "train.optimizer",
                f"unknown {self.optimizer!r}{close_matches(self.optimizer, choices)}; choices: {', '.join(choices)}",
            )
        _check(
            self.optimizer != "adamw" or not self.optimizer_kwargs,
            "train.optimizer_kwargs",
            "only for train.optimizer=timm/NAME (AdamW takes train.beta1, train.beta2, train.eps)",
        )
        for name in ("image_lr", "text_lr"):
            value = getattr(self, name)
            _check(
                value is None or value > 0, f"train.{name}", f"must be > 0 or null (train.lr), got {value}"
            )
        for name in ("image_layer_decay", "text_layer_decay"):
            value = getattr(self, name)
            _check(0 < value <= 1, f"train.{name}", f"must be in (0, 1] (1.0: off), got {value}")

    def _check_schedule(self) -> None:
        """The schedule keys: a known shape, and a cooldown that fits after the warmup."""
        _check(
            self.schedule in SCHEDULES,
            "train.schedule",
            f"must be one of {SCHEDULES}, got {self.schedule!r}",
        )
        _check(self.cooldown_steps >= 0, "train.cooldown_steps", f"must be >= 0, got {self.cooldown_steps}")
        _check(self.cooldown_power > 0, "train.cooldown_power", f"must be > 0, got {self.cooldown_power}")
        _check(
            self.cooldown_end_lr >= 0, "train.cooldown_end_lr", f"must be >= 0, got {self.cooldown_end_lr}"
        )
        if self.schedule != "const_cooldown":
            _check(
                self.cooldown_steps == 0,
                "train.cooldown_steps",
                f"only applies to train.schedule=const_cooldown (schedule is {self.schedule})",
            )
            return
        room = self.steps - self.warmup_steps
        _check(
            0 < self.cooldown_steps <= room,
            "train.cooldown_steps",
            f"must be in 1..{room} (train.steps - train.warmup_steps) with const_cooldown, got {self.cooldown_steps}",
        )


@dataclass
class LossConfig:
    name: str | None = None
    """clip (InfoNCE), siglip (pairwise sigmoid), coca (contrastive + captioning) or another module of
    pretrain/objectives/specs/; null: chosen from the model (open_clip CoCa models: coca, models with `init_logit_bias`: siglip, others: clip)."""
    clip_weight: float = 1.0
    """Weight of the contrastive part: loss = clip_weight x contrastive (+ caption_weight x caption)."""
    caption_weight: float = 2.0
    """Weight of the caption cross-entropy (coca only; open_clip's default)."""
    chunk_size: int | None = None
    """Block size of the contrastive loss (null: the plain, untiled loss); clip and coca then keep only
    log-sum-exps over chunk_size x chunk_size logit blocks and recompute the blocks in backward, so their
    memory grows linearly with the batch; siglip recomputes chunk_size-row tiles of each rank's block."""
    ring: bool = False
    """clip and coca: pass the other ranks' features peer-to-peer around the ring of ranks instead of
    all-gathering them (one other rank's block held at a time); needs chunk_size. siglip always does."""

    def __post_init__(self) -> None:
        names = objective_names()
        _check(
            self.name is None or self.name in names,
            "loss.name",
            f"must be one of {names} or null (chosen from the model), got {self.name!r}",
        )
        for name in ("clip_weight", "caption_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(
            self.chunk_size is None or self.chunk_size > 0,
            "loss.chunk_size",
            f"must be > 0 or null, got {self.chunk_size}",
        )
        _check(
            not self.ring or self.chunk_size is not None,
            "loss.ring",
            "needs loss.chunk_size (the ring is part of the tiled loss), got loss.chunk_size=null",
        )


@dataclass
class DistConfig:
    strategy: str = "ddp"
    """ddp, fsdp or deepspeed."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (1, 2 or 3)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU), nccl or gloo."""
    timeout: float = 600.0
    """Seconds a collective waits for the other ranks before this rank fails (torch's own default is 600 for
    NCCL, 1800 for gloo): a hung rank then ends the job, and torchrun restarts it (launch/torchrun.sh
    MAX_RESTARTS). Longer than any wait between collectives: the slowest step, a checkpoint, an eval."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (less activation memory, ~30% more compute)."""
    compile: bool | None = None
    """Deprecated alias of `train.compile`."""
    param_dtype: str = "auto"
    """FSDP compute dtype of the gathered weights: auto (bf16 under train.precision=bf16, else fp32),
    fp32 or bf16."""
    reduce_dtype: str = "fp32"
    """FSDP gradient reduce-scatter dtype (fp32 or bf16)."""
    reshard_after_forward: bool = True
    """FSDP: free gathered weights after forward (ZeRO-3-like); false keeps them to backward (ZeRO-2-like)."""
    offload: bool = False
    """Keep sharded parameters and optimizer states in CPU memory (FSDP CPUOffloadPolicy; DeepSpeed
    offload_optimizer, and offload_param at stage 3)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON config used whole instead of the one built from these keys (batch keys are set to
    match train.*)."""
    sync_bn: bool = False
    """ddp: BatchNorm statistics over the global batch (torch's SyncBatchNorm; open_clip's `--use-bn-sync`),
    for image towers with BatchNorm (e.g. ResNets); a model without BatchNorm is left as it is."""
    static_graph: bool = False
    """ddp: DistributedDataParallel(static_graph=True) (open_clip's `--ddp-static-graph`): DDP records the
    first iteration's graph and reuses it."""

    def __post_init__(self) -> None:
        _check(
            self.strategy in STRATEGIES,
            "dist.strategy",
            f"must be one of {STRATEGIES}, got {self.strategy!r}",
        )
        _check(self.zero_stage in (1, 2, 3), "dist.zero_stage", f"must be 1, 2 or 3, got {self.zero_stage}")
        _check(self.backend in ("auto", "nccl", "gloo"), "dist.backend", f"bad backend {self.backend!r}")
        _check(self.timeout > 0, "dist.timeout", f"must be > 0 seconds, got {self.timeout}")
        for name, allowed in (("param_dtype", ("auto", "fp32", "bf16")), ("reduce_dtype", ("fp32", "bf16"))):
            value = getattr(self, name)
            _check(value in allowed, f"dist.{name}", f"must be one of {allowed}, got {value!r}")
        why = {
            "sync_bn": "BatchNorm is synced only under DDP here",
            "static_graph": "an option of DDP's wrapper",
        }
        for name, reason in why.items():
            _check(
                not getattr(self, name) or self.strategy == "ddp",
                f"dist.{name}",
                f"needs dist.strategy=ddp ({reason}), got dist.strategy={self.strategy}",
            )


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Checkpoint cadence in steps (a checkpoint is always written at the end)."""
    keep: int = 3
    """How many checkpoints to keep (oldest deleted first), locally and at `remote`."""
    remote: str | None = None
    """fsspec URL that completed checkpoints are copied to (in the background, by rank 0), under
    `{remote}/{run.name}/`; `resume=latest` looks there too (null: no copies)."""

    def __post_init__(self) -> None:
        _check(self.every > 0, "checkpoint.every", f"must be > 0, got {self.every}")
        _check(self.keep > 0, "checkpoint.keep", f"must be > 0, got {self.keep}")


@dataclass
class LogConfig:
    every: int = 10
    """Metrics cadence in steps (the final step is always logged)."""
    wandb: bool = False
    """Log to wandb (offline when no WANDB_API_KEY is set)."""
    wandb_project: str = "clip-pretrain"
    """wandb project name."""
    tensorboard: bool = False
    """Write TensorBoard events to `{run_dir}/tensorboard`."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU (null: look the GPU up in pretrain/training/flops.py; CPU: no MFU)."""

    def __post_init__(self) -> None:
        _check(self.every > 0, "log.every", f"must be > 0, got {self.every}")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "log.peak_tflops", "must be > 0 or null")


@dataclass
class EvalTaskConfig:
    name: str = MISSING
    """Name of the eval (the `eval` key of its result lines), e.g. imagenet."""
    root: str = MISSING
    """Eval set in clip_benchmark's webdataset layout: a folder or an s3:// or http(s):// URL."""
    task: str | None = None
    """zeroshot_classification or zeroshot_retrieval (null: from ROOT's dataset_type.txt)."""

    def __post_init__(self) -> None:
        _check(bool(self.name) and "=" not in self.name, "eval.tasks.name", f"bad eval name {self.name!r}")
        _check(
            self.task in (None, *EVAL_TASKS),
            "eval.tasks.task",
            f"must be one of {EVAL_TASKS} or null, got {self.task!r}",
        )


@dataclass
class EvalConfig:
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    """Eval sets, each `{name, root}` (+ optional `task`), in clip_benchmark's webdataset layout."""
    val_data: str | None = None
    """Held-out shards in the training format (shard spec): contrastive validation loss over all of them."""
    zeroshot: str | None = None
    """Deprecated alias: the same as one task `{name: zeroshot, root: DIR}`."""
    every: int = 0
    """Evaluate every N steps (0: only at the end of training)."""
    batch_size: int = 256
    """Images per forward pass of the evaluation."""
    workers: int = 0
    """Data-loading worker processes per rank while evaluating (0: in the training process)."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", "must be >= 0")
        _check(self.batch_size > 0, "eval.batch_size", "must be > 0")
        _check(self.workers >= 0, "eval.workers", "must be >= 0")
        names = [t.name for t in self.all_tasks()] + (["val"] if self.val_data else [])
        repeated = sorted({n for n in names if names.count(n) > 1})
        _check(not repeated, "eval.tasks", f"eval names must be unique, {repeated[:1]} repeats")

    def all_tasks(self) -> list[EvalTaskConfig]:
        """`tasks`, and the deprecated `zeroshot` folder as a task named `zeroshot`."""
        alias = [EvalTaskConfig(name="zeroshot", root=self.zeroshot)] if self.zeroshot else []
        return [*alias, *self.tasks]

    @property
    def enabled(self) -> bool:
        return bool(self.all_tasks() or self.val_data)


@dataclass
class DistillConfig:
    model: str | None = None
    """Teacher for open_clip's distillation term (`loss_distill`): an open_clip model name (with
    `pretrained`), an export folder, a checkpoint folder or a run directory; null: no teacher term."""
    pretrained: str | None = None
    """The teacher's open_clip pretrained tag or weights file (only with an open_clip name in `model`)."""
    weight: float = 1.0
    """Weight of the distillation terms (`loss_distill`, `loss_zscl`) in the total loss."""
    temperature: float = 2.0
    """ZSCL: softmax temperature of the image-to-reference-text distributions (ZSCL's T)."""
    reference_data: str | None = None
    """ZSCL: shard spec of reference images (their captions are ignored), or `synthetic`; null: no ZSCL."""
    reference_texts: str | None = None
    """ZSCL: text file of reference phrases, one per line (needed with `reference_data`)."""
    reference_batch_size: int = 16
    """ZSCL: reference images per rank per optimizer step."""

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "distill.weight", f"must be >= 0, got {self.weight}")
        _check(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")
        _check(
            self.reference_batch_size > 0,
            "distill.reference_batch_size",
            f"must be > 0, got {self.reference_batch_size}",
        )
        _check(
            self.pretrained is None or self.model is not None,
            "distill.pretrained",
            f"needs distill.model (the teacher's open_clip name), got distill.pretrained={self.pretrained}",
        )
        _check(
            (self.reference_data is None) == (self.reference_texts is None),
            "distill.reference_texts" if self.reference_data else "distill.reference_data",
            "ZSCL needs both distill.reference_data and distill.reference_texts",
        )

    @property
    def zscl(self) -> bool:
        """True when the ZSCL reference-set term is on."""
        return self.reference_data is not None

    @property
    def enabled(self) -> bool:
        """True when any distillation term is on (a teacher, or ZSCL's reference set)."""
        return self.model is not None or self.zscl
