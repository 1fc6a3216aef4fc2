"""What every config section shares: the one-line error that names a key, its check, close-match hints,
and the fixed choices some keys take."""

from __future__ import annotations

import difflib
import logging

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
