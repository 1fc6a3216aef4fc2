"""MetaCLIP's metadata: the entries file, and matching a caption against every entry at once.

The entries file is UTF-8 text, one entry per line; whitespace around an entry is stripped, empty lines are
ignored and a repeated entry is merged into its first occurrence (counted, never an error), so an entry's id
is its position among the distinct entries. Matching is case-sensitive, as in the paper's Algorithm 1
(``entry in text``), with an Aho-Corasick automaton (pyahocorasick): one pass over the caption finds every
entry it contains, overlapping ones included, whatever the number of entries.

Two modes: ``substring`` is Algorithm 1 as written; ``words`` is the rule of MetaCLIP's released
``substr_matching.py``: the caption gets a space at both ends and around each of ``, . ; : ? ! ``` ``, tabs
and line breaks become spaces, and an entry matches only as `` entry `` (so "cat" no longer matches "category").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import ahocorasick
import numpy as np

from data_tools.metaclip.config import MATCH_MODES
from webshards import outputs
from webshards.outputs import Location

_PUNCTUATION = ",.;:?!`"
_SPACES = "\t\n\r"


@dataclass(frozen=True)
class Entries:
    """The distinct entries of an entries file, in file order, and what reading it found."""

    names: tuple[str, ...]
    duplicates: int
    """Lines that repeated an earlier entry (merged into it)."""
    digest: str
    """sha256 of the distinct entries: tasks check they read the file the job started with."""


def read_entries(location: Location) -> Entries:
    """Read an entries file; a ValueError naming it when it is missing, not UTF-8 or holds no entry."""
    try:
        data = outputs.read_bytes(location)
    except FileNotFoundError:
        raise ValueError(f"entries file not found: {location}") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"entries file {location}: line {line} is not UTF-8") from None
    stripped = [line.strip() for line in lines]
    given = [entry for entry in stripped if entry]
    names = tuple(dict.fromkeys(given))  # first occurrence wins, order kept
    if not names:
        raise ValueError(f"entries file {location} holds no entry (one per line, UTF-8)")
    digest = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()
    return Entries(names, len(given) - len(names), digest)


def load_checked(location: Location, digest: str) -> Entries:
    """The entries at ``location``, which must be those the job started with (a task's check)."""
    entries = read_entries(location)
    if entries.digest != digest:
        raise ValueError(f"entries file {location} changed while the job ran; rerun the job")
    return entries


def spaced(text: str) -> str:
    """A caption as the ``words`` mode sees it (MetaCLIP's released spacing rule)."""
    for mark in _PUNCTUATION:
        text = text.replace(mark, f" {mark} ")
    for space in _SPACES:
        text = text.replace(space, " ")
    return f" {text} "


class Matcher:
    """Finds the ids of the entries a caption contains (each id once, ascending)."""

    def __init__(self, names: tuple[str, ...], mode: str = "substring") -> None:
        if mode not in MATCH_MODES:
            raise ValueError(f"match mode must be one of {MATCH_MODES}, got {mode!r}")
        self.mode = mode
        self.automaton = ahocorasick.Automaton()
        for entry_id, name in enumerate(names):
            self.automaton.add_word(f" {name} " if mode == "words" else name, entry_id)
        self.automaton.make_automaton()

    def match(self, caption: str) -> list[int]:
        """Ids of the entries found in ``caption``."""
        text = spaced(caption) if self.mode == "words" else caption
        return sorted({entry_id for _, entry_id in self.automaton.iter(text)})


@lru_cache(maxsize=2)
def cached_matcher(location: str, digest: str, mode: str) -> Matcher:
    """One automaton per worker process and job, however many shards the process matches."""
    return Matcher(load_checked(location, digest).names, mode)


@lru_cache(maxsize=2)
def entry_keys(location: str, digest: str) -> np.ndarray:
    """A 64-bit hash of each entry's text (the entry's half of a balancing draw's key)."""
    names = load_checked(location, digest).names
    keys = [
        int.from_bytes(hashlib.blake2b(n.encode("utf-8"), digest_size=8).digest(), "little") for n in names
    ]
    return np.array(keys, dtype=np.uint64)
