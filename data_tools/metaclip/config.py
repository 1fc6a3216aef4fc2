"""The settings of a ``metaclip`` job."""

from __future__ import annotations

from dataclasses import dataclass

MATCH_MODES = ("substring", "words")
"""substring: ``entry in caption`` (Algorithm 1); words: whole words (MetaCLIP's released code), see entries.py."""


@dataclass(frozen=True)
class MetaclipConfig:
    """What to match and how to balance."""

    entries: str
    """The entries file (a path or fsspec URL): one entry per line."""
    t: int
    """The cap: an entry matched by more than ``t`` pairs keeps each with probability ``t / count`` (about ``t``
    pairs through its own draws); the paper's 20,000 gave its 400M set."""
    seed: int = 0
    """Seeds the balancing draws: the same seed keeps the same pairs."""
    match: str = "substring"
    """substring (Algorithm 1) or words (MetaCLIP's released spacing rule), see entries.py."""

    def __post_init__(self) -> None:
        if self.t < 1:
            raise ValueError(f"t must be at least 1, got {self.t}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.match not in MATCH_MODES:
            raise ValueError(f"match must be one of {MATCH_MODES}, got {self.match!r}")
