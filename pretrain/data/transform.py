"""The model's image transform, run on uint8 tensors instead of PIL images.

open_clip's transforms are torchvision Compose pipelines: resize/crop on a PIL image, then ToTensor and
Normalize. Resizing in PIL costs ~1.4 ms for a 400 px image on one core; torch's vectorised antialiased
uint8 resize does the same bicubic (or bilinear) resampling in ~0.4 ms, and ToTensor + Normalize cost
another ~1 ms per image in float. `TensorTransform` runs the same steps with the same parameters (random
crops drawn by the step objects themselves, from the same RNG) on a channels-last uint8 tensor, through
torchvision's v2 kernels, and leaves the conversion to float
and the normalisation to `normalize`, which the loader runs once per batch on the training device: the
workers hand over uint8 images, a quarter of the bytes through shared memory and host-to-device copies.

Only transforms known to behave the same on tensors are accepted; anything else (timm transforms, custom
resizes, colour jitter) makes `TensorTransform.wrap` return None and the PIL transform runs as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pretrain.data.decode import to_uint8

RESAMPLING = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)  # torch's uint8 antialiased kernels
GEOMETRIC = (T.Resize, T.RandomResizedCrop, T.CenterCrop, T.RandomHorizontalFlip)


def _tensor_safe(t) -> bool:
    """True for a step that gives the PIL result (up to resampling) on a uint8 tensor, or that only makes
    the image RGB (open_clip's MaybeConvertMode / _convert_to_rgb: the decoder already did)."""
    if isinstance(t, (T.Resize, T.RandomResizedCrop)):
        return t.interpolation in RESAMPLING and t.antialias is not False
    if isinstance(t, GEOMETRIC):
        return True
    return type(t).__name__ == "MaybeConvertMode" or getattr(t, "__name__", "") == "_convert_to_rgb"


class TensorTransform:
    """`geometric(image)`: uint8 CHW tensor after the resize/crop steps; `normalize(batch)`: ToTensor +
    Normalize on a uint8 batch; `__call__` does both, equal to the wrapped transform up to resampling."""

    def __init__(self, steps: list, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.steps = [t for t in steps if isinstance(t, GEOMETRIC)]
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def wrap(cls, transform) -> TensorTransform | None:
        """The tensor form of `transform`, or None when it has a step this cannot run on tensors."""
        steps = list(getattr(transform, "transforms", []))
        to_tensor = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)), None)
        if to_tensor is None or len(steps) != to_tensor + 2 or not isinstance(steps[-1], T.Normalize):
            return None
        if steps[-1].inplace or not all(_tensor_safe(t) for t in steps[:to_tensor]):
            return None
        return cls(steps[:to_tensor], steps[-1].mean, steps[-1].std)

    def geometric(self, image: Image.Image) -> torch.Tensor:
        """The resize/crop steps on an RGB image, as a uint8 (3, H, W) tensor."""
        return self.apply(to_uint8(image)).contiguous()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The resize/crop steps on a uint8 (3, H, W) tensor on any device; random parameters come from
        the CPU generator, as in the PIL transform."""
        for step in self.steps:
            x = _apply(step, x)
        return x

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) on any device -> float32 (x / 255 - mean) / std, as ToTensor + Normalize."""
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(shape) * 255
        std = torch.tensor(self.std, device=images.device).view(shape) * 255
        return images.float().sub_(mean).div_(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.geometric(image))


def split_transform(transform) -> tuple[Callable[[Image.Image], torch.Tensor], Callable | None]:
    """(per-sample transform for the decoding workers, per-batch `normalize` to run on the device or None).

    With a transform `TensorTransform` can run, the workers resize/crop to uint8 tensors and ToTensor +
    Normalize run once per batch on the device; otherwise the PIL transform runs whole in the workers."""
    fast = TensorTransform.wrap(transform)
    return (fast.geometric, fast.normalize) if fast else (transform, None)


def _apply(step, x: torch.Tensor) -> torch.Tensor:
    """One torchvision v1 step on a uint8 tensor through the v2 kernels (the v1 tensor path resizes uint8
    in float, 5x slower), drawing its random parameters exactly as the v1 step does."""
    if isinstance(step, T.RandomResizedCrop):
        top, left, h, w = step.get_params(x, step.scale, step.ratio)
        return F.resized_crop(x, top, left, h, w, step.size, step.interpolation, antialias=True)
    if isinstance(step, T.Resize):
        return F.resize(x, step.size, step.interpolation, step.max_size, antialias=True)
    if isinstance(step, T.CenterCrop):
        return F.center_crop(x, step.size)
    return F.horizontal_flip(x) if torch.rand(1) < step.p else x  # RandomHorizontalFlip
