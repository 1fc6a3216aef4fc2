"""The `pretrain` and `data-tools` commands: --help works, bad flags are one line and a non-zero exit."""

from __future__ import annotations

import sys

import pytest
from helpers import run_cmd


@pytest.mark.parametrize("cmd", [["pretrain", "--help"], ["pretrain", "train", "--help"], ["pretrain", "export", "--help"],
                                 ["pretrain", "eval", "--help"], ["data-tools", "--help"]])  # fmt: skip
def test_help(cmd):
    proc = run_cmd([str(__import__("pathlib").Path(sys.executable).parent / cmd[0]), *cmd[1:]])
    assert proc.returncode == 0 and "usage" in proc.stdout


@pytest.mark.parametrize("args", [["frobnicate"], ["export", "--checkpoint"], ["eval", "--batch-size", "x"]])
def test_bad_flag_is_one_line(args):
    proc = run_cmd([sys.executable, "-m", "pretrain.cli", *args])
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr
