"""Captions/s of filter's caption rules on one core: language ID (py3langid) and vocabulary matching
(Aho-Corasick over open_clip's ImageNet-1k class names, whole words), each alone over the same captions.

    .venv/bin/python bench/text_filters.py                 # 100,000 captions
    .venv/bin/python bench/text_filters.py --captions 20000

Captions are alt-text-like: 3 to 20 words drawn from English web-caption words, a third of them holding a
class name, a tenth a sentence in another language; the model and the automaton are built before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.text_filters import (  # noqa: E402
    IMAGENET,
    identify_languages,
    language_identifier,
    vocabulary_automaton,
    vocabulary_mask,
)

WORDS = (
    "photo", "of", "a", "the", "with", "and", "in", "on", "for", "sale", "vintage", "new", "black", "white",
    "red", "blue", "large", "small", "wooden", "house", "garden", "beach", "city", "street", "portrait",
    "stock", "image", "free", "download", "hd", "wallpaper", "woman", "man", "child", "dog", "car", "kitchen",
    "design", "modern", "style", "2019", "best", "cheap", "high", "quality", "logo", "vector", "illustration",
    "background",
)  # fmt: skip
OTHER = ("Photo de la plage au coucher du soleil", "Ein schönes Haus mit Garten", "Foto de una calle vieja")


def captions(count: int, seed: int = 0) -> list[str]:
    """``count`` synthetic alt-texts (see the module docstring)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = list(rng.choice(WORDS, rng.integers(3, 21)))
        if rng.random() < 1 / 3:
            words.insert(int(rng.integers(0, len(words))), str(rng.choice(IMAGENET_CLASSNAMES)))
        out.append(str(rng.choice(OTHER)) if rng.random() < 0.1 else " ".join(words))
    return out


def rate(fn, texts: list[str]) -> float:
    """Captions per second of ``fn`` over ``texts``."""
    start = time.perf_counter()
    fn(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--captions", type=int, default=100000, help="captions timed")
    texts = captions(parser.parse_args().captions)
    language_identifier(), vocabulary_automaton(IMAGENET)  # built outside the timing, as once per process
    words = np.mean([len(t.split()) for t in texts])
    print(f"{len(texts)} captions, {words:.1f} words on average")
    print(f"language ID (py3langid):        {rate(identify_languages, texts):>10,.0f} captions/s")
    print(
        f"vocabulary (ImageNet-1k, A-C):  {rate(lambda t: vocabulary_mask(t, IMAGENET), texts):>10,.0f} captions/s"
    )


if __name__ == "__main__":
    main()
