"""How captions are decoded (`DecodingConfig`): plain settings without torch, so that `pretrain caption
--help` and a bad flag answer at once; `pretrain.generate.search` decodes with them."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("beam", "top_k", "top_p")


@dataclass(frozen=True)
class DecodingConfig:
    """How captions are decoded; the defaults are open_clip `generate`'s."""

    method: str = "beam"
    """`beam` (group beam search), `top_k` or `top_p` (sampling)."""
    max_length: int = 30
    """Most tokens in a caption, start and end tokens included (`generate`'s `seq_len`)."""
    min_length: int = 5
    """End-of-text is not allowed before this many tokens (`min_seq_len`)."""
    num_beams: int = 6
    num_beam_groups: int = 3
    top_k: int = 1
    top_p: float = 0.1
    """`top_p` keeps the most probable tokens whose probabilities sum to at least this."""
    temperature: float = 1.0
    """Sampling only (beam search ignores it, as `generate` does)."""
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"decoding: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.max_length > self.min_length >= 0:
            raise ValueError(
                f"decoding: max_length ({self.max_length}) must exceed min_length ({self.min_length})"
            )
        if self.num_beam_groups < 1 or self.num_beams < 2 or self.num_beams % self.num_beam_groups:
            raise ValueError(
                f"decoding: num_beams ({self.num_beams}) must be at least 2 and a multiple of "
                f"num_beam_groups ({self.num_beam_groups})"
            )
        if self.top_k < 1 or not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ValueError("decoding: top_k must be >= 1, top_p in (0, 1] and temperature > 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"decoding: repetition_penalty must be > 0, got {self.repetition_penalty}")
