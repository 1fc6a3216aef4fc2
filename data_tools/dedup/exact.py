"""Exact duplicates: identical image bytes (sha256), optionally with the same normalised caption too."""

from __future__ import annotations

import hashlib
import re

DIGEST_BYTES = 32
_SPACES = re.compile(r"\s+")


def normalise_caption(caption: str) -> str:
    """Lower case, whitespace collapsed and trimmed: captions differing only in these match."""
    return _SPACES.sub(" ", caption).strip().lower()


def sample_digest(image: bytes, caption: str | None = None) -> bytes:
    """sha256 of the image bytes; with a caption, sha256 of (image digest, normalised caption)."""
    digest = hashlib.sha256(image).digest()
    if caption is None:
        return digest
    return hashlib.sha256(digest + b"\x00" + normalise_caption(caption).encode("utf-8")).digest()
