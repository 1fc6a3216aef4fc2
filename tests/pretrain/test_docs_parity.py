"""docs/training.md's "Coming from open_clip_train" table against open_clip_train itself: one row for every
argument of the installed open_clip_train's parser, and every key the table names exists in the config (and
every `key=value` it shows loads)."""

from __future__ import annotations

import argparse
import re

import pytest
from helpers import ROOT

from pretrain.config import all_keys, load_config

SECTION = "## Coming from open_clip_train"
SECTIONS = ("run", "model", "data", "train", "loss", "dist", "checkpoint", "log", "eval", "distill")
KEY = re.compile(rf"^(?:{'|'.join(SECTIONS)})\.[\w.*]+$|^resume$")


def open_clip_train_flags() -> list[str]:
    """The first option string of every argument open_clip_train's `parse_args` defines, read from its
    parser (captured as it parses an empty command line)."""
    from open_clip_train import params

    parsers = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    argparse.ArgumentParser.parse_args = capture
    try:
        params.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return [a.option_strings[0] for a in parsers[0]._actions if a.option_strings and a.dest != "help"]


def table_rows() -> list[list[str]]:
    """The cells of every table row of the section (header and rule rows left out)."""
    text = (ROOT / "docs" / "training.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows if not row[0].startswith(("open_clip", "---"))]


def named_keys(cell: str) -> list[str]:
    """The `section.key[=value]` settings a cell shows, each backticked piece split at spaces."""
    pieces = [p for code in re.findall(r"`([^`]+)`", cell) for p in code.split()]
    return [p for p in pieces if KEY.match(p.split("=", 1)[0])]


def test_every_open_clip_train_argument_has_a_row():
    flags = open_clip_train_flags()
    assert len(flags) >= 90  # open_clip_train 3.3 has 90
    documented = {re.sub(r"`", "", row[0]) for row in table_rows()}
    lacking = [f for f in flags if f not in documented]
    assert not lacking, f"open_clip_train arguments without a row: {lacking}"


def test_every_key_the_table_names_exists():
    keys = set(all_keys())
    named = [k.split("=", 1)[0] for row in table_rows() for k in named_keys(row[1])]
    assert len(named) > 60
    missing = [
        k for k in named
        if not (k in keys or (k.endswith(".*") and any(key.startswith(k[:-1]) for key in keys)))
    ]  # fmt: skip
    assert not missing, f"keys the table names that the config lacks: {missing}"


@pytest.mark.parametrize("row", [r for r in table_rows() if any("=" in k for k in named_keys(r[1]))], ids=str)
def test_every_setting_the_table_shows_loads(row):
    load_config(None, [k for k in named_keys(row[1]) if "=" in k])
