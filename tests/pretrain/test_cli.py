"""The `pretrain` and `data-tools` commands: --help works, bad flags are one line and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY, refused, run_cmd


def help_text(argv: list[str], capsys) -> str:
    """`pretrain ARGV --help` in this process: exit status 0; returns what it printed."""
    from pretrain.cli import main

    status = main([*argv, "--help"])
    out = capsys.readouterr().out
    assert status == 0 and "usage" in out
    return out


@pytest.mark.parametrize("script", ["pretrain", "data-tools"])
def test_help_of_the_console_scripts(script):
    """The installed entry points themselves; their subcommands' help is the same parser, checked in-process."""
    proc = run_cmd([str(Path(sys.executable).parent / script), "--help"])
    assert proc.returncode == 0 and "usage" in proc.stdout


@pytest.mark.parametrize("command", ["train", "export", "eval", "config", "adapt"])
def test_help(command, capsys):
    help_text([command], capsys)


@pytest.mark.parametrize("args", [["frobnicate"], ["export", "--checkpoint"], ["eval", "--batch-size", "x"]])
def test_bad_flag_is_one_line(args, capsys):
    assert "error" in refused(args, capsys)


def test_train_help_says_where_the_keys_are_documented(capsys):
    out = help_text(["train"], capsys)
    assert "docs/training.md" in out and "pretrain config" in out


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        # an empty mapping is a key's value (train.optimizer_kwargs), not a section
        nested = isinstance(value, dict) and value
        out |= flatten(value, f"{prefix}{key}.") if nested else {f"{prefix}{key}": value}
    return out


def test_config_prints_every_key_with_its_value_and_meaning(capsys):
    from omegaconf import OmegaConf

    from pretrain.cli import main
    from pretrain.config import Config

    status = main(["config", "--config", str(TINY), "train.steps=7"])
    out, err = capsys.readouterr()
    assert status == 0, err
    printed = {}
    for line in out.splitlines():
        setting, meaning = line.split("  # ", 1)
        key, value = setting.split(": ", 1)
        printed[key] = (yaml.safe_load(value), meaning)
    # The reference: OmegaConf's view of the schema, and the YAML file itself, not our key walker.
    schema = flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    assert list(printed) == list(schema)
    expected = schema | flatten(yaml.safe_load(TINY.read_text())) | {"train.steps": 7}
    assert {k: v for k, (v, _) in printed.items()} == expected
    assert all(meaning.strip() for _, meaning in printed.values())  # every key is documented
    assert printed["train.steps"][1] == "Optimizer steps to run in total."


def test_config_refuses_what_train_refuses(capsys):
    line = refused(["config", "model.name=tiny-clp"], capsys)  # nothing on stdout either
    # the closest name first; other tiny-* configs may follow it
    assert line.startswith(
        "pretrain config: error: model.name: unknown model 'tiny-clp' (did you mean 'tiny-clip'"
    )


def test_config_piped_into_a_reader_that_stops_ends_quietly():
    # `true` exits before the command has started writing: as `| head` does once it has its lines
    cmd = f"set -o pipefail; '{sys.executable}' -m pretrain.cli config --config '{TINY}' | true"
    proc = run_cmd(["bash", "-c", cmd])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
