"""Turning raw tar samples into model inputs, fast, and naming what is wrong with bad ones.

JPEGs much larger than the model input are decoded at reduced size (libjpeg's DCT scaling through PIL's
`draft`), which is several times cheaper than a full decode and loses nothing the resize would keep.
`seeded` gives each sample random streams of its own, so its augmentation replays wherever it runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from webshards.samples import IMAGE_EXTENSIONS, BadSample, image_extension

JSON_FIELD = "json:"
"""`data.text_key` prefix naming a field of the sample's KEY.json (`json:captions`) instead of a member."""


def caption_of(raw: dict, key: str = "txt") -> str:
    """The sample's caption under `key`: a member's text, whole (`txt`; `cls` labels in eval shards), or a
    field of its KEY.json (`json:FIELD`). A field holding a list is several captions: one is drawn from the
    sample's seed (`__seed__`, set by the stream), so the draw is the same on any ranks, workers or resume and
    differs between epochs."""
    captions = _texts(raw, key)
    if not captions:
        raise BadSample("empty_caption", f"no non-empty caption under data.text_key={key}")
    # the stream's seed is already a hash of (seed, partition, block, index): its residue is a fair draw
    return captions[raw.get("__seed__", 0) % len(captions)]


def _texts(raw: dict, key: str) -> list[str]:
    """The non-empty captions a sample holds under `key`; `;`-separated alternatives (`txt;caption`,
    `json:a;b`) are tried in order and the first that holds a caption wins, as open_clip's `--text-key` and
    `--json-text-key` do."""
    is_json = key.startswith(JSON_FIELD)
    names = key.removeprefix(JSON_FIELD).split(";") if is_json else key.split(";")
    member = "json" if is_json else next((m for m in names if raw.get(m) is not None), names[0])
    data = raw.get(member)
    if data is None:
        raise BadSample("missing_caption", f"no KEY.{member} (data.text_key={key})")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        values = [json.loads(text).get(field) for field in names] if is_json else [text]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise BadSample("bad_caption", f"KEY.{member}: {e}") from None
    if all(value is None for value in values):
        raise BadSample(
            "missing_caption", f"no {' or '.join(map(repr, names))} in KEY.json (data.text_key={key})"
        )
    for value in values:
        texts = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(v, str) for v in texts):
            raise BadSample("bad_caption", f"{key} holds {type(value).__name__}, not text or a list of texts")
        texts = [v for v in texts if v is not None and v.strip()]
        if texts:
            return texts
    return []


def open_image(
    raw: dict, min_size: int, image_keys: tuple[str, ...] = IMAGE_EXTENSIONS, max_pixels: int | None = None
) -> Image.Image:
    """Decode the sample's image (its first member of `image_keys`) in RGB, at reduced size when it is at least
    twice `min_size` (0: full size). An image of more than `max_pixels` pixels is a bad sample, refused from its
    header before the costly decode (open_clip's `--max-image-pixels`)."""
    ext = image_extension(raw, image_keys)
    if ext is None:
        raise BadSample("missing_image")
    image = open_header(raw[ext], max_pixels)
    try:
        if image.format == "JPEG" and min_size:
            image.draft("RGB", (min_size, min_size))  # keeps both sides >= min_size
        image.load()
        if image.mode != "RGB":  # convert() copies even when there is nothing to convert
            image = image.convert("RGB")
    except BAD_IMAGE as e:
        raise BadSample("bad_image", str(e)) from None
    return image


BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises for bytes that are no image it can read."""


def open_header(data: bytes, max_pixels: int | None) -> Image.Image:
    """The image of `data`, its header read (PIL decodes lazily); a bad sample when PIL cannot read it
    (`bad_image`) or it has more than `max_pixels` pixels (`too_many_pixels`)."""
    try:
        image = Image.open(io.BytesIO(data))
    except BAD_IMAGE as e:
        raise BadSample("bad_image", str(e)) from None
    if max_pixels and image.width * image.height > max_pixels:
        raise BadSample(
            "too_many_pixels", f"{image.width}x{image.height} > data.max_image_pixels={max_pixels}"
        )
    return image


def decode_cpu(
    raw: dict,
    transform: Callable[[Image.Image], torch.Tensor],
    size: int,
    text_key: str = "txt",
    image_keys: tuple[str, ...] = IMAGE_EXTENSIONS,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, str]:
    """(image tensor, caption): the model's own transform runs in the loader worker."""
    caption = caption_of(raw, text_key)
    return transform(open_image(raw, size, image_keys, max_pixels)), caption


def to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB image as a uint8 (3, H, W) tensor with channels-last strides (what torch's uint8 resize
    kernels want)."""
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return tensor.view(image.height, image.width, 3).permute(2, 0, 1)


def decode_uint8(
    raw: dict,
    size: int,
    text_key: str = "txt",
    image_keys: tuple[str, ...] = IMAGE_EXTENSIONS,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, str]:
    """(uint8 CHW tensor at reduced-decode size, caption): resizing and normalising happen on the device."""
    return decode_cpu(raw, to_uint8, size, text_key, image_keys, max_pixels)


def raw_image_bytes(
    raw: dict, text_key: str = "txt", max_pixels: int | None = None
) -> tuple[torch.Tensor, str]:
    """(encoded JPEG bytes as a uint8 tensor, caption): for nvJPEG decoding on the GPU."""
    caption = caption_of(raw, text_key)
    data = next((raw[e] for e in ("jpg", "jpeg") if e in raw), None)
    if data is None:
        raise BadSample("missing_image", "gpu decoding needs JPEG")
    if max_pixels:
        open_header(data, max_pixels)
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
