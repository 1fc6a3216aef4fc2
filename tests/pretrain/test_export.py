"""Export: open_clip loads the folder with `local-dir:` and gives the project's embeddings; eval runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import torch
from helpers import TINY, run_cmd

from pretrain.model import load_trained


def export(checkpoint: Path, output: Path) -> subprocess.CompletedProcess:
    return run_cmd(
        [
            sys.executable,
            "-m",
            "pretrain.cli",
            "export",
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(output),
        ]
    )


def test_export_loads_in_open_clip_with_same_embeddings(tmp_path, demo_data):
    train = [sys.executable, "-m", "pretrain.train", "--config", str(TINY), f"run.dir={tmp_path}", "run.name=r",
             "train.steps=3", f"data.train={demo_data}/train/{{00000..00003}}.tar", f"eval.zeroshot={demo_data}"]  # fmt: skip
    assert run_cmd(train).returncode == 0
    out = tmp_path / "export"
    proc = export(tmp_path / "r", out)
    assert proc.returncode == 0, proc.stderr
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

    proc = run_cmd(
        [sys.executable, "-m", "pretrain.cli", "eval", "--checkpoint", str(out), "--zeroshot", str(demo_data)]
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (
        result["eval"] == "zeroshot"
        and result["samples"] == 64
        and 0 <= result["top1"] <= result["top5"] <= 1
    )


def test_export_of_missing_checkpoint_is_one_line(tmp_path):
    proc = export(tmp_path / "nope", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no checkpoint at" in proc.stderr
    assert not (tmp_path / "o").exists()
