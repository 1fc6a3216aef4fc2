"""`model.*`: which open_clip model, its starting weights, locked towers and open_clip's overrides."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config_sections.base import _check


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
