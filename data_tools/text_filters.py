"""The caption rules of ``filter``: language identification and vocabulary matching (see filter.py).

Language ID is py3langid (langid.py's naive Bayes over byte n-grams; its model ships inside the wheel, so
nothing is downloaded at run time): per caption the most likely language and its normalised probability.
Vocabulary matching is one Aho-Corasick automaton (pyahocorasick) over all terms, lower case, whitespace
collapsed; a hit counts only on word boundaries, as the regex ``(?<!\\w)TERM(?!\\w)`` would, so ``cat``
matches "a cat." and "cat-like" but not "category". Both are built once per process (``lru_cache``): every
task of a worker, and every Ray task on a worker, reuses them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from webshards import outputs

IMAGENET = "imagenet"
"""The ``vocabulary`` that means open_clip's ImageNet-1k class names (IMAGENET_CLASSNAMES)."""
LANGUAGE_SCHEMA = pa.schema(
    [("uid", pa.string()), ("language", pa.string()), ("language_confidence", pa.float32())]
)


@lru_cache(maxsize=1)
def language_identifier() -> Any:
    """py3langid's identifier with normalised probabilities (loaded once per process, ~0.5 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> list[str]:
    """The ISO 639 codes (mostly two letters) the identifier can answer."""
    return list(language_identifier().labels)


def check_languages(codes: tuple[str, ...]) -> None:
    """A ValueError naming a code the identifier never answers (it would keep nothing)."""
    known = set(known_languages())
    for code in codes:
        if code not in known:
            raise ValueError(f"language {code!r} is not one of py3langid's codes: {', '.join(sorted(known))}")


def identify_languages(captions: list[str | None]) -> tuple[list[str], np.ndarray]:
    """The most likely language of each caption and its probability (float32). Newlines become spaces first,
    as DataComp does before its fastText model."""
    identifier = language_identifier()
    found = [identifier.classify((c or "").replace("\n", " ")) for c in captions]
    languages = [language for language, _ in found]
    return languages, np.array([p for _, p in found], dtype=np.float32)


def with_languages(table: pa.Table) -> pa.Table:
    """``table`` with ``language`` and ``language_confidence`` columns from its captions (kept as they are when
    already there)."""
    if "language" in table.column_names:
        return table
    languages, confidence = identify_languages(table["caption"].to_pylist())
    table = table.append_column("language", pa.array(languages, pa.string()))
    return table.append_column("language_confidence", pa.array(confidence, pa.float32()))


def language_rows(table: pa.Table) -> pa.Table:
    """The ``STEM_languages.parquet`` rows of a table that has its languages (``with_languages``)."""
    return table.select(LANGUAGE_SCHEMA.names).cast(LANGUAGE_SCHEMA)


def normalise(text: str) -> str:
    """Lower case, whitespace runs as one space, trimmed: how captions and terms are compared."""
    return " ".join(text.lower().split())


def read_vocabulary(source: str) -> tuple[str, ...]:
    """The terms of ``source`` (``imagenet``, or a file, local or fsspec URL, one term per line), normalised,
    blank lines dropped; a ValueError names a missing or empty file."""
    if source == IMAGENET:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        lines = list(IMAGENET_CLASSNAMES)
    else:
        if not outputs.is_remote(source) and not Path(source).is_file():
            raise ValueError(f"vocabulary file {source} does not exist (or pass --vocabulary imagenet)")
        lines = outputs.read_bytes(source).decode("utf-8").splitlines()
    terms = tuple(dict.fromkeys(t for t in map(normalise, lines) if t))
    if not terms:
        raise ValueError(f"vocabulary {source} has no terms")
    return terms


@lru_cache(maxsize=4)
def vocabulary_automaton(source: str) -> Any:
    """The Aho-Corasick automaton of ``source``'s terms, each stored with its length."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for term in read_vocabulary(source):
        automaton.add_word(term, len(term))
    automaton.make_automaton()
    return automaton


def _is_word(char: str) -> bool:
    """A word character, as ``\\w`` of Python's re reads one."""
    return char.isalnum() or char == "_"


def contains_term(caption: str | None, automaton: Any) -> bool:
    """Whether the normalised caption holds a term with no word character right before or after it."""
    text = normalise(caption or "")
    for end, length in automaton.iter(text):
        start = end - length + 1
        before = text[start - 1] if start > 0 else " "
        after = text[end + 1] if end + 1 < len(text) else " "
        if not _is_word(before) and not _is_word(after):
            return True
    return False


def vocabulary_mask(captions: list[str | None], source: str) -> np.ndarray:
    """Per caption, whether it contains a term of the vocabulary ``source``."""
    automaton = vocabulary_automaton(source)
    return np.array([contains_term(c, automaton) for c in captions], dtype=bool)
