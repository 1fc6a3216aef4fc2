"""Export: open_clip loads the folder with `local-dir:` and gives the project's embeddings; eval runs."""

from __future__ import annotations

import json

import open_clip
import torch
from helpers import cli_output, refused, train_in_process

from pretrain.models.build import load_trained


def test_export_loads_in_open_clip_with_same_embeddings(tmp_path, demo_data, capsys):
    """Train, export and eval in this process (the entry point's exit statuses are test_config's)."""
    train = [
        "train.steps=3",
        f"data.train={demo_data}/train/{{00000..00003}}.tar",
        f"eval.zeroshot={demo_data}",
    ]
    train_in_process(tmp_path, train, name="r")
    out = tmp_path / "export"
    cli_output(["export", "--checkpoint", str(tmp_path / "r"), "--output", str(out)], capsys)
    assert {p.name for p in out.iterdir()} >= {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "README.md",
    }
    config = json.loads((out / "open_clip_config.json").read_text())
    assert (
        set(config) == {"model_cfg", "preprocess_cfg"}
        and config["model_cfg"]["vision_cfg"]["image_size"] == 64
    )
    card = (out / "README.md").read_text()
    assert "zeroshot" in card and "train/{00000..00003}.tar" in card

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    ours = load_trained(tmp_path / "r")
    model.eval(), ours.model.eval()
    images = torch.randn(3, 3, 64, 64)
    texts = tokenizer(["a red star", "a blue circle", "a photo of a white square"])
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), ours.model.encode_image(images), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(model.encode_text(texts), ours.model.encode_text(texts), rtol=0, atol=1e-6)

    printed = cli_output(["eval", "--checkpoint", str(out), "--zeroshot", str(demo_data)], capsys)
    result = json.loads(printed.strip().splitlines()[-1])
    assert (
        result["eval"] == "zeroshot"
        and result["samples"] == 64
        and 0 <= result["top1"] <= result["top5"] <= 1
    )


def test_export_of_missing_checkpoint_is_one_line(tmp_path, capsys):
    argv = ["export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]
    assert "no checkpoint at" in refused(argv, capsys, not_made=tmp_path / "o")
