"""Config: defaults <- YAML <- overrides, and one clear line for every bad input."""

from __future__ import annotations

import sys

import pytest
import yaml
from helpers import ROOT, TINY, run_cmd

from pretrain.config import ConfigError, load_config, save_config


def test_tiny_config_loads_with_overrides():
    cfg = load_config(TINY, ["train.steps=7", "train.lr=0.01", "resume=latest", "data.train_weights=[1,2]"])
    assert cfg.model.name == "tiny-clip"
    assert (cfg.train.steps, cfg.train.lr, cfg.resume) == (7, 0.01, "latest")
    assert cfg.data.train_weights == [1.0, 2.0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stpes=3", "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
        ("trian.steps=3", "unknown config key 'trian' (did you mean 'train'?)"),
        ("train.steps=abc", "train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
        ("train.precision=fp8", "train.precision: must be one of ('fp32', 'bf16'), got 'fp8'"),
        ("train.batch_size=0", "train.batch_size: must be > 0, got 0"),
        ("dist.zero_stage=4", "dist.zero_stage: must be 1, 2 or 3, got 4"),
        ("train.steps", "override 'train.steps' must look like section.key=value"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert str(err.value) == message


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config(bad)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_redacts_secrets(tmp_path):
    cfg = load_config(TINY, ["log.wandb_project=p"])
    cfg.run.name = "my-token-run"  # a value, not a key: kept
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["steps"] == cfg.train.steps and saved["run"]["name"] == "my-token-run"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["--config", str(TINY), "train.stpes=3"], "did you mean 'train.steps'"),
        (["--config", str(TINY), "train.steps=-1"], "train.steps: must be > 0"),
        (["--config", str(TINY), "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_exits_2_with_one_line(args, needle, tmp_path):
    proc = run_cmd([sys.executable, "-m", "pretrain.train", *args, f"run.dir={tmp_path}"], cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
