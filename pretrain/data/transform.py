"""The model's image transform, run on uint8 tensors instead of PIL images.

open_clip's transforms are torchvision Compose pipelines: resize/crop on a PIL image, then ToTensor and
Normalize. Resizing in PIL costs ~1.4 ms for a 400 px image on one core; torch's vectorised antialiased
uint8 resize does the same bicubic (or bilinear) resampling in ~0.4 ms, and ToTensor + Normalize cost
another ~1 ms per image in float. `TensorTransform` runs the same steps with the same parameters (random
crops drawn by the step objects themselves, from the same RNG) on a channels-last uint8 tensor, through
torchvision's v2 kernels, and leaves the conversion to float
and the normalisation to `normalize`, which the loader runs once per batch on the training device: the
workers hand over uint8 images, a quarter of the bytes through shared memory and host-to-device copies.

The augmentations of open_clip's `AugmentationCfg` run too: colour jitter and grayscale (open_clip's
wrappers with a probability, torchvision's steps, timm's `RandomApply`) are the step objects themselves
called on the uint8 tensor (torchvision's tensor kernels: the same random draws, pixels within a few levels
of PIL's), and timm's RandomErasing, which works on the normalised tensor, has its rectangles and noise drawn
per sample by the step itself (`draw_erasing`) and pasted into the normalised batch (`erase`). Anything else
(custom resizes, nearest resampling, other timm steps) makes `TensorTransform.wrap` return None and the PIL
transform runs as it is.

Steps draw from torch's CPU generator (torchvision) and from Python's `random` (open_clip's probability
wrappers, timm's crop and erasing): `pretrain.data.decode.seeded` seeds both per sample, so a sample's
augmentation depends on its seed alone, wherever and whenever it runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from open_clip import transform as oc
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pretrain.data.decode import to_uint8

RESAMPLING = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)  # torch's uint8 antialiased kernels
CROPS = (T.RandomResizedCrop, RandomResizedCropAndInterpolation)
GEOMETRIC = (T.Resize, *CROPS, T.CenterCrop, T.RandomHorizontalFlip)
COLOUR = (T.ColorJitter, T.Grayscale, T.RandomGrayscale, oc.color_jitter, oc.gray_scale)
"""Steps that run as they are on a uint8 tensor, drawing what they draw on a PIL image."""

Patches = list[tuple[tuple[slice, ...], torch.Tensor]]
"""One image's erased rectangles: (index into the CHW image, the values put there)."""


def _resampling_safe(t) -> bool:
    modes = t.interpolation if isinstance(t.interpolation, (tuple, list)) else (t.interpolation,)
    return all(m in RESAMPLING for m in modes) and getattr(t, "antialias", True) is not False


def _tensor_safe(t) -> bool:
    """True for a step that gives the PIL result (up to resampling, or a few levels for colour) on a uint8
    tensor, or that only makes the image RGB (open_clip's MaybeConvertMode / _convert_to_rgb: the decoder
    already did)."""
    if isinstance(t, (T.Resize, *CROPS)):
        return _resampling_safe(t)
    if isinstance(t, T.RandomApply):  # timm's colour jitter with a probability
        return all(isinstance(s, COLOUR) for s in t.transforms)
    if isinstance(t, (*GEOMETRIC, *COLOUR)):
        return True
    return _is_convert(t)


def _is_convert(t) -> bool:
    return type(t).__name__ == "MaybeConvertMode" or getattr(t, "__name__", "") == "_convert_to_rgb"


def _erasing(steps: list) -> RandomErasing | None | bool:
    """timm's RandomErasing after Normalize, None without one, False for anything else there (or an erasing
    step whose draws this cannot replay: `_erase` is where timm draws them)."""
    if not steps:
        return None
    step = steps[0]
    ok = len(steps) == 1 and type(step) is RandomErasing and hasattr(step, "_erase") and step.device == "cpu"
    return step if ok else False


class TensorTransform:
    """`geometric(image)`: uint8 CHW tensor after the per-sample steps; `normalize(batch)`: ToTensor +
    Normalize on a uint8 batch; `erase(batch, patches)`: timm's RandomErasing with the rectangles
    `draw_erasing` drew; `__call__` does them all, equal to the wrapped transform up to resampling."""

    def __init__(self, steps: list, mean, std, erasing: RandomErasing | None = None) -> None:
        self.steps = [t for t in steps if not _is_convert(t)]
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.erasing = erasing

    @classmethod
    def wrap(cls, transform) -> TensorTransform | None:
        """The tensor form of `transform`, or None when it has a step this cannot run on tensors."""
        steps = list(getattr(transform, "transforms", []))
        to_tensor = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)), None)
        if (
            to_tensor is None
            or len(steps) < to_tensor + 2
            or not isinstance(steps[to_tensor + 1], T.Normalize)
        ):
            return None
        erasing = _erasing(steps[to_tensor + 2 :])
        if erasing is False or steps[to_tensor + 1].inplace:
            return None
        if not all(_tensor_safe(t) for t in steps[:to_tensor]):
            return None
        return cls(steps[:to_tensor], steps[to_tensor + 1].mean, steps[to_tensor + 1].std, erasing)

    @property
    def geometric_only(self) -> bool:
        """Only resize/crop/flip steps: what the `cpu` path runs on tensors (colour and erasing run on PIL
        there, exactly as open_clip's transform)."""
        return self.erasing is None and all(isinstance(t, GEOMETRIC) for t in self.steps)

    def geometric(self, image: Image.Image) -> torch.Tensor:
        """The per-sample steps on an RGB image, as a uint8 (3, H, W) tensor."""
        return self.apply(to_uint8(image)).contiguous()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample steps (resize/crop, colour) on a uint8 (3, H, W) tensor on any device; random
        parameters come from the CPU generators, as in the PIL transform."""
        for step in self.steps:
            x = _apply(step, x)
        return x

    def draw_erasing(self, size: tuple[int, int]) -> Patches:
        """The rectangles (and their noise, on the CPU) that RandomErasing would erase in a normalised image
        of `size` (H, W), drawn by the step itself: called after `apply`, in the same seeded context, it
        draws what the PIL transform draws last."""
        if self.erasing is None:
            return []
        patches = _Recorder()
        self.erasing._erase(patches, 3, *size, torch.float32)
        return patches.items

    def erase(self, images: torch.Tensor, patches: list[Patches]) -> torch.Tensor:
        """Paste each image's drawn rectangles into the normalised batch (on its device)."""
        for image, drawn in zip(images, patches, strict=True):
            for index, values in drawn:
                image[index] = values.to(image.device, non_blocking=True)
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) on any device -> float32 (x / 255 - mean) / std, as ToTensor + Normalize."""
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(shape) * 255
        std = torch.tensor(self.std, device=images.device).view(shape) * 255
        return images.float().sub_(mean).div_(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = self.geometric(image)
        patches = self.draw_erasing(x.shape[-2:])
        return self.erase(self.normalize(x[None]), [patches])[0]


class _Recorder:
    """Stands in for the image in `RandomErasing._erase`: keeps the assignments instead of making them."""

    def __init__(self) -> None:
        self.items: Patches = []

    def __setitem__(self, index: tuple[slice, ...], values: torch.Tensor) -> None:
        self.items.append((index, values))


def split_transform(transform) -> tuple[Callable[[Image.Image], torch.Tensor], Callable | None]:
    """(per-sample transform for the decoding workers, per-batch `normalize` to run on the device or None).

    With a transform of resize/crop steps only, the workers resize/crop to uint8 tensors and ToTensor +
    Normalize run once per batch on the device; otherwise the PIL transform runs whole in the workers."""
    fast = TensorTransform.wrap(transform)
    return (fast.geometric, fast.normalize) if fast and fast.geometric_only else (transform, None)


def _apply(step, x: torch.Tensor) -> torch.Tensor:
    """One step on a uint8 tensor: resize/crop steps through the v2 kernels (the v1 tensor path resizes uint8
    in float, 5x slower), drawing their random parameters exactly as the step does; colour steps as they
    are (torchvision's tensor kernels)."""
    if isinstance(step, CROPS):
        top, left, h, w = step.get_params(x, step.scale, step.ratio)
        mode = step.interpolation
        if isinstance(mode, (tuple, list)):  # timm's 'random' interpolation
            mode = random.choice(mode)  # drawn after the box, as timm does
        return F.resized_crop(x, top, left, h, w, list(step.size), mode, antialias=True)
    if isinstance(step, T.Resize):
        return F.resize(x, step.size, step.interpolation, step.max_size, antialias=True)
    if isinstance(step, T.CenterCrop):
        return F.center_crop(x, step.size)
    if isinstance(step, T.RandomHorizontalFlip):
        return F.horizontal_flip(x) if torch.rand(1) < step.p else x
    return step(x)  # colour: open_clip's wrappers, ColorJitter, (Random)Grayscale, RandomApply
