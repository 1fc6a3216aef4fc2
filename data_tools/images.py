"""Fetch an image (local path or URL) and resize it as img2dataset does, ready to store in a shard.

Resize modes follow img2dataset: ``no`` keeps the image as is, ``keep_ratio`` makes the smaller side
``image_size``, ``center_crop`` does that then crops the centre square, ``border`` makes the larger side
``image_size`` and pads the rest white to a square.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import fsspec
from PIL import Image, ImageOps

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
BORDER_COLOUR = (255, 255, 255)  # img2dataset pads with white


class FetchError(Exception):
    """The image bytes could not be read (missing file, HTTP error, timeout)."""


class ResizeError(Exception):
    """The image was decoded but rejected or not resizable (e.g. too elongated)."""


@dataclass(frozen=True)
class ImageConfig:
    """How images are stored."""

    image_size: int = 256
    """Target side in pixels (what it means depends on ``resize_mode``)."""
    resize_mode: str = "keep_ratio"
    """One of RESIZE_MODES."""
    jpeg_quality: int = 95
    """JPEG quality of re-encoded images."""
    max_aspect_ratio: float | None = None
    """Reject images whose longer/shorter side ratio is above this (failed_to_resize)."""

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be at least 1, got {self.max_aspect_ratio}")


def fetch(location: str, timeout: float = 10.0, retries: int = 2) -> bytes:
    """The bytes at a local path or fsspec URL; transient errors are retried with exponential backoff."""
    if "://" not in location:
        try:
            with open(location, "rb") as f:
                return f.read()
        except OSError as error:
            raise FetchError(f"{type(error).__name__}: {error}") from None
    for attempt in range(retries + 1):
        try:
            return _fetch_url(location, timeout)
        except FileNotFoundError as error:  # 404 and the like: retrying will not help
            raise FetchError(f"not found: {error}") from None
        except Exception as error:  # noqa: BLE001 - network errors come in many types
            if attempt == retries:
                raise FetchError(f"{type(error).__name__}: {error}") from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _fetch_url(url: str, timeout: float) -> bytes:
    protocol = url.split("://", 1)[0]
    options = {}
    if protocol in ("http", "https"):
        import aiohttp  # fsspec's http backend; imported here so local-only jobs need no network stack

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=timeout)}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs.cat_file(path)  # one GET, no HEAD request or block cache for a small file


def decode(data: bytes) -> Image.Image:
    """Decode fully (a truncated file fails here, not later), upright per EXIF, as RGB."""
    image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, BORDER_COLOUR + (255,))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def process(data: bytes, config: ImageConfig) -> tuple[bytes, int, int]:
    """Stored JPEG bytes and the original (width, height) of an encoded image.

    Raises ``ResizeError`` when the image is rejected; decoding errors propagate from PIL.
    """
    if config.resize_mode == "no" and _is_plain_jpeg(data):
        width, height = _checked_size(decode(data), config)
        return data, width, height  # already a JPEG: store the original bytes untouched
    image = decode(data)
    width, height = _checked_size(image, config)
    try:
        image = resize(image, config.image_size, config.resize_mode)
    except (ValueError, OSError) as error:
        raise ResizeError(f"{type(error).__name__}: {error}") from None
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=config.jpeg_quality)
    return out.getvalue(), width, height


def _is_plain_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _checked_size(image: Image.Image, config: ImageConfig) -> tuple[int, int]:
    width, height = image.size
    if config.max_aspect_ratio is not None and max(width, height) > config.max_aspect_ratio * min(
        width, height
    ):
        raise ResizeError(f"aspect ratio {max(width, height) / min(width, height):.2f} above the maximum")
    return width, height


def resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize an RGB image with one of RESIZE_MODES."""
    if mode == "no":
        return image
    width, height = image.size
    scale = size / (min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height))
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if mode == "center_crop":
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif mode == "border":
        canvas = Image.new("RGB", (size, size), BORDER_COLOUR)
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        image = canvas
    return image
