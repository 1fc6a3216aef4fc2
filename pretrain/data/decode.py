"""Turning raw tar samples into model inputs, fast, and naming what is wrong with bad ones.

JPEGs much larger than the model input are decoded at reduced size (libjpeg's DCT scaling through PIL's
`draft`), which is several times cheaper than a full decode and loses nothing the resize would keep.
`seeded` gives each sample random streams of its own, so its augmentation replays wherever it runs.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from webshards.samples import BadSample, image_extension


def caption_of(raw: dict, key: str = "txt") -> str:
    """The sample's text under `key` (`txt` captions; `cls` labels in eval shards)."""
    data = raw.get(key)
    if data is None:
        raise BadSample("missing_caption")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
    except UnicodeDecodeError as e:
        raise BadSample("bad_caption", str(e)) from None
    if not text.strip():
        raise BadSample("empty_caption")
    return text


def open_image(raw: dict, min_size: int) -> Image.Image:
    """Decode the sample's image in RGB, at reduced size when it is at least twice `min_size` (0: full size)."""
    ext = image_extension(raw)
    if ext is None:
        raise BadSample("missing_image")
    try:
        image = Image.open(io.BytesIO(raw[ext]))
        if image.format == "JPEG" and min_size:
            image.draft("RGB", (min_size, min_size))  # keeps both sides >= min_size
        image.load()
        if image.mode != "RGB":  # convert() copies even when there is nothing to convert
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample("bad_image", str(e)) from None
    return image


def decode_cpu(
    raw: dict, transform: Callable[[Image.Image], torch.Tensor], size: int, text_key: str = "txt"
) -> tuple[torch.Tensor, str]:
    """(image tensor, caption): the model's own transform runs in the loader worker."""
    caption = caption_of(raw, text_key)
    return transform(open_image(raw, size)), caption


def to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB image as a uint8 (3, H, W) tensor with channels-last strides (what torch's uint8 resize
    kernels want)."""
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return tensor.view(image.height, image.width, 3).permute(2, 0, 1)


def decode_uint8(raw: dict, size: int) -> tuple[torch.Tensor, str]:
    """(uint8 CHW tensor at reduced-decode size, caption): resizing and normalising happen on the device."""
    return decode_cpu(raw, to_uint8, size)


def raw_image_bytes(raw: dict) -> tuple[torch.Tensor, str]:
    """(encoded JPEG bytes as a uint8 tensor, caption): for nvJPEG decoding on the GPU."""
    caption = caption_of(raw)
    data = next((raw[e] for e in ("jpg", "jpeg") if e in raw), None)
    if data is None:
        raise BadSample("missing_image", "gpu decoding needs JPEG")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), caption


@contextlib.contextmanager
def seeded(seed: int, restore: bool) -> Iterator[None]:
    """Seed torch's CPU generator and Python's `random` (what the transforms draw from) for one sample;
    `restore`: put both back after (in the training process, whose random streams are its own). The CPU
    generator alone: torch.manual_seed also seeds CUDA and goes through dynamo's wrappers, ~75 us per call."""
    generator = torch.default_generator
    saved = (generator.get_state(), random.getstate()) if restore else None
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            generator.set_state(saved[0])
            random.setstate(saved[1])
