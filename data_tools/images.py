"""Fetch an image (local path or URL) and resize it as img2dataset does, ready to store in a shard.

Resize modes follow img2dataset: ``no`` keeps the image as is, ``keep_ratio`` makes the smaller side
``image_size``, ``center_crop`` does that then crops the centre square, ``border`` makes the larger side
``image_size`` and pads the rest white to a square.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import fsspec
from PIL import Image, ImageOps

from webshards.urls import url_to_fs

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
BORDER_COLOUR = (255, 255, 255)  # img2dataset pads with white
MAX_IMAGE_BYTES = 32 * 2**20
"""Default download limit per image: far above any real photo, far below a worker's memory."""
MAX_IMAGE_PIXELS = 89_478_485
"""Default decode limit per image: PIL's own default (a 0.25 GB RGB image); a few-KB PNG can declare more."""
CHUNK_BYTES = 2**20


class FetchError(Exception):
    """The image bytes could not be read (missing file, HTTP error, timeout, too large)."""


class TooLargeError(FetchError):
    """The download went past the byte limit."""


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


def fetch(location: str, timeout: float = 10.0, retries: int = 2, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes at a local path or fsspec URL; transient errors are retried with exponential backoff.

    More than ``max_bytes`` is a ``FetchError`` after reading at most that much (an endless download
    never fills the memory)."""
    if "://" not in location:
        try:
            with open(location, "rb") as f:
                return _read_limited(f, max_bytes)
        except OSError as error:
            raise FetchError(f"{type(error).__name__}: {error}") from None
    for attempt in range(retries + 1):
        try:
            with _open_url(location, timeout) as f:
                return _read_limited(f, max_bytes)
        except TooLargeError:  # retrying will not help
            raise
        except FileNotFoundError as error:  # 404 and the like
            raise FetchError(f"not found: {error}") from None
        except Exception as error:  # noqa: BLE001 - network errors come in many types
            if attempt == retries:
                raise FetchError(f"{type(error).__name__}: {error}") from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _open_url(url: str, timeout: float) -> IO[bytes]:
    protocol = url.split("://", 1)[0]
    if protocol not in ("http", "https"):
        fs, path = url_to_fs(url)  # s3://: the project's S3 client (endpoint, retries: webshards.s3)
        return fs.open(path, "rb")
    import aiohttp  # fsspec's http backend; imported here so local-only jobs need no network stack

    # the timeout covers the whole download, body included (a trickling server is cut off)
    options = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
    fs, path = fsspec.core.url_to_fs(url, **options)
    # block_size=0: one streaming GET; a given size skips fsspec's HEAD request (a stream needs none)
    return fs.open(path, "rb", block_size=0, size=1)


def _read_limited(stream: IO[bytes], max_bytes: int) -> bytes:
    """Read to the end, refusing (``TooLargeError``) as soon as more than ``max_bytes`` arrived."""
    size = getattr(stream, "size", None)  # fsspec files of known size are refused before any read
    if isinstance(size, int) and size > max_bytes:
        raise TooLargeError(f"image larger than the maximum of {max_bytes} bytes ({size} bytes)")
    chunks, total = [], 0
    while chunk := stream.read(min(CHUNK_BYTES, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise TooLargeError(f"image larger than the maximum of {max_bytes} bytes (download stopped)")
    return b"".join(chunks)


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Decode no image above ``max_pixels`` for the duration: PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``), its warning (above the limit) raised as an error like the
    ``DecompressionBombError`` above twice the limit. A build task runs inside this (process-wide)."""
    saved = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


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
