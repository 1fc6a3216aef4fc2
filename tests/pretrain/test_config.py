"""Config: defaults <- YAML <- overrides, and one clear line for every bad input."""

from __future__ import annotations

import re
import sys

import pytest
import yaml
from helpers import ROOT, TINY, refused, run_cmd

from pretrain.config import ConfigError, load_config, save_config


def test_tiny_config_loads_with_overrides():
    weights = ["data.train_weights=[1,2]", "data.sampling=resampled"]
    cfg = load_config(TINY, ["train.steps=7", "train.lr=0.01", "resume=latest", *weights])
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
        (
            "data.train_weights=[1,2]",  # with the default data.sampling=epoch the weights would be ignored
            "data.train_weights: needs data.sampling=resampled (epoch sampling reads every shard once and "
            "ignores weights)",
        ),
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


CLI_ERRORS = [
    (["--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["--config", str(TINY), "train.stpes=3"], "did you mean 'train.steps'"),
    (["--config", str(TINY), "train.steps=-1"], "train.steps: must be > 0"),
    (["--config", str(TINY), "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("args, needle", [CLI_ERRORS[1], CLI_ERRORS[3]])
def test_cli_exits_2_with_one_line(args, needle, tmp_path):
    """The real entry point as a process: a config error and an argparse error, each one line and exit 2."""
    proc = run_cmd([sys.executable, "-m", "pretrain.train", *args, f"run.dir={tmp_path}"], cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize("args, needle", CLI_ERRORS)
def test_train_refuses_bad_input_with_one_line(args, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # missing.yaml is looked up where the command runs
    assert needle in refused(["train", *args, f"run.dir={tmp_path}"], capsys, tmp_path / "tiny")


def one_line_exit_2(args: list[str], run_dir, capsys) -> str:
    """`pretrain train` in this process: exit code 2, exactly one stderr line, no run directory made."""
    return refused(["train", "--config", str(TINY), *args, f"run.dir={run_dir}"], capsys, run_dir / "tiny")


def test_model_errors_are_one_line_before_anything_is_written(tmp_path, capsys):
    missing = tmp_path / "weights.safetensors"
    # The closest name first; other configs in configs/models/ (tiny-siglip, ...) may follow it.
    line = one_line_exit_2(["model.name=tiny-clp"], tmp_path, capsys)
    assert line.startswith("pretrain: error: model.name: unknown model 'tiny-clp' (did you mean 'tiny-clip'")
    cases = {
        "model.pretrained=laion2b": "model.pretrained: unknown tag 'laion2b' for tiny-clip; "
        "open_clip has no pretrained tags for tiny-clip (give a weights file)",
        f"model.pretrained={missing}": f"model.pretrained: weights file not found: {missing}",
        "data.train_weights=[1,2]": "data.train_weights: needs data.sampling=resampled "
        "(epoch sampling reads every shard once and ignores weights)",
    }
    for override, line in cases.items():
        assert one_line_exit_2([override], tmp_path, capsys) == f"pretrain: error: {line}"


def test_unknown_tag_names_the_model_s_tags_from_open_clip(tmp_path, capsys):
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model("ViT-B-32")  # the reference: open_clip's own registry
    line = one_line_exit_2(["model.name=ViT-B-32", "model.pretrained=no_such_tag"], tmp_path, capsys)
    assert line.startswith("pretrain: error: model.pretrained: unknown tag 'no_such_tag' for ViT-B-32; ")
    assert (
        f"open_clip's tags for ViT-B-32: {', '.join(tags[:3])}, " in line and f"({len(tags)} in all)" in line
    )
    assert len(line) < 300  # short: a few tags and the count, not the registry


def test_model_name_typo_suggests_close_names_only():
    import open_clip

    from pretrain.models.build import resolve_model_name

    with pytest.raises(ConfigError) as err:
        resolve_model_name("vit-b-23")
    message = str(err.value)
    assert message.startswith("model.name: unknown model 'vit-b-23' (did you mean 'ViT-B-32'")
    suggested = re.findall(r"'([^']+)'", message)[1:]
    assert 1 <= len(suggested) <= 3 and set(suggested) <= set(open_clip.list_models())
    assert len(message) < 120  # a few close names, not the list of every model
    assert resolve_model_name(str(ROOT / "configs/models/tiny-clip.json")) == "tiny-clip"


def test_existing_weights_file_passes_the_check(tmp_path):
    from pretrain.models.build import check_pretrained

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    check_pretrained("tiny-clip", str(weights))  # a file is open_clip's to load: no error here
    check_pretrained("ViT-B-32", "LAION2B-S34B-B79K")  # open_clip normalises case and dashes of a tag
