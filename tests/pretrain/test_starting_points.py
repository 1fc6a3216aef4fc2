"""Starting points (`model.pretrained`): an open_clip_train `epoch_N.pt`, a `.safetensors` file, an export
folder, a checkpoint folder and a run directory of ours each load weights equal to the source's, and the
run starts from them at step 0 with a fresh optimizer; weights that do not fit are one line naming the
file and the first keys; a file that would run code is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, read_jsonl, refused, train_in_process
from safetensors.torch import save_file

from pretrain.config import ConfigError, ModelConfig, load_config
from pretrain.models.build import build_model, load_trained
from pretrain.publish.export import export
from pretrain.training.trainer import Trainer


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A trained tiny-clip run (seed 7, so not the init of a seed-0 run) and every format of its weights."""
    root = tmp_path_factory.mktemp("starting-points")
    overrides = ["train.steps=2", "train.seed=7", "train.batch_size=8", "checkpoint.every=2"]
    run = train_in_process(root, overrides, name="source")
    weights = load_trained(run).model.state_dict()
    epoch = root / "epoch_1.pt"  # as open_clip_train saves it from a DDP-wrapped model
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
    optimizer.step()
    torch.save(
        {"epoch": 1, "name": "source", "state_dict": {f"module.{k}": v for k, v in weights.items()},
         "optimizer": optimizer.state_dict()},
        epoch,
    )  # fmt: skip
    save_file({k: v.contiguous() for k, v in weights.items()}, str(root / "weights.safetensors"))
    export(run, root / "export")
    return {
        "weights": weights,
        "epoch_N.pt": epoch,
        "safetensors": root / "weights.safetensors",
        "export": root / "export",
        "checkpoint": run / "checkpoints/step_00000002",
        "run_dir": run,
    }


@pytest.mark.parametrize("kind", ["epoch_N.pt", "safetensors", "export", "checkpoint", "run_dir"])
def test_starting_point_loads_the_source_weights_and_trains_from_step_0(source, kind, tmp_path):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "train.steps=1", "train.batch_size=8", "log.every=1",
                             f"model.pretrained={source[kind]}"])  # fmt: skip
    trainer = Trainer(cfg)
    try:
        start = trainer.model.state_dict()
        assert start.keys() == source["weights"].keys()
        for name, value in source["weights"].items():
            assert torch.equal(start[name], value), name
        assert trainer.state.step == 0 and not trainer.optimizer.state  # not the source's step or optimizer
        start = {k: v.clone() for k, v in start.items()}
        trainer.train()
    finally:
        trainer.close()
    rows = [r for r in read_jsonl(cfg.run_dir / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["samples_seen"]) for r in rows] == [(1, 8)]
    assert rows[0]["lr"] == pytest.approx(cfg.train.lr / cfg.train.warmup_steps)  # warmup starts over
    assert not torch.equal(trainer.model.visual.proj, start["visual.proj"])


class NotATensor:
    """A class that unpickling a file would have to import and call."""


def coca_safetensors(path: Path) -> Path:
    save_file(build_model(ModelConfig(name="tiny-coca")).model.state_dict(), str(path))
    return path


def bad_files(root: Path, weights: dict) -> dict[str, Path]:
    """Files that do not fit tiny-clip, or that are not safe to unpickle."""
    missing = {k: v for k, v in weights.items() if k != "visual.proj"}
    torch.save({"state_dict": missing}, root / "missing.pt")
    torch.save({**weights, "visual.proj": torch.zeros(3, 3)}, root / "shape.pt")
    torch.save({"state_dict": weights, "extra": NotATensor()}, root / "unsafe.pt")
    (root / "empty-folder").mkdir()
    (root / "garbage.safetensors").write_bytes(b"not a safetensors file")
    (root / "garbage.pt").write_bytes(b"not a pickle")
    return {
        "missing": root / "missing.pt",
        "shape": root / "shape.pt",
        "coca": coca_safetensors(root / "coca.safetensors"),
        "unsafe": root / "unsafe.pt",
        "folder": root / "empty-folder",
        "garbage.safetensors": root / "garbage.safetensors",
        "garbage.pt": root / "garbage.pt",
    }


EXPECTED = {
    "missing": "does not fit tiny-clip: missing keys visual.proj",
    "shape": "does not fit tiny-clip: size mismatch for visual.proj",
    "coca": "does not fit tiny-clip: missing keys positional_embedding, text_projection, ",
    "unsafe": "refusing to load it: unpickling it would call",
    "folder": "is neither an export folder",
    "garbage.safetensors": "not a readable weights file (Error while deserializing header",
    "garbage.pt": "not a readable weights file (",
}


def test_weights_that_do_not_fit_are_one_line(source, tmp_path):
    files = bad_files(tmp_path, source["weights"])
    for kind, path in files.items():
        with pytest.raises(ConfigError) as err:
            build_model(ModelConfig(pretrained=str(path)))
        message = str(err.value)
        assert message.startswith(f"model.pretrained: {path}") and "\n" not in message, message
        assert EXPECTED[kind] in message, message
        if kind == "coca":
            assert "in all); unexpected keys text.cls_emb, text.ln_final.bias" in message


def test_cli_refuses_a_wrong_model_before_writing(source, tmp_path, capsys):
    """`pretrain train` with a CoCa's weights for tiny-clip: exit 2, one line, no run directory."""
    weights = coca_safetensors(tmp_path / "coca.safetensors")
    args = ["train", "--config", str(TINY), f"run.dir={tmp_path}", f"model.pretrained={weights}"]
    assert refused(args, capsys, tmp_path / "tiny").startswith(
        f"pretrain: error: model.pretrained: {weights} does not fit tiny-clip: missing keys"
    )
