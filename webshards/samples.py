"""What a raw sample (one key's tar members, as ``layout.iter_shard`` yields it) holds, and the error for
one that cannot be used."""

from __future__ import annotations

from typing import Any

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Tar member extensions that hold the image, in the order a reader looks for them."""


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def image_extension(sample: dict[str, Any], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> str | None:
    """The extension of the sample's image member (the first of `extensions` present), or None."""
    return next((ext for ext in extensions if ext in sample), None)
