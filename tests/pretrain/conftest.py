"""Fixtures the pretrain tests share across modules."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from helpers import trained_tiny_clip
from PIL import Image

from data_tools.cli import main as data_tools_main
from pretrain.publish.export import export
from webshards.layout import iter_shard


@pytest.fixture(scope="session")
def adapt_setup(tmp_path_factory) -> tuple[Path, Path]:
    """(export folder, adaptation set) for the `pretrain adapt` tests: tiny-clip trained 30 steps on the demo's
    held-out domain (~7 s: its features score well above chance, so methods' predictions differ from class to
    class), and 16 classes with 16 labelled train images and 8 test images each. Session-scoped: the adapt
    test modules share one."""
    tmp = tmp_path_factory.mktemp("adapt")
    args = ["demo-data", "--output", str(tmp / "demo"), "--domain", "new", "--samples", "512"]
    args += ["--samples-per-shard", "128", "--eval-samples", "128", "--adapt-samples", "256", "--workers", "1"]  # fmt: skip
    assert data_tools_main(args) == 0
    run = trained_tiny_clip(tmp, f"{tmp}/demo/train/{{00000..00003}}.tar", steps=30, batch_size=32)
    return export(run, tmp / "export"), tmp / "demo" / "adapt"


@pytest.fixture(scope="module")
def held_out(demo_data) -> tuple[list[Image.Image], list[str]]:
    """The 64 held-out demo images and their captions (the transformers export tests compare on them)."""
    samples = [s for shard in sorted((demo_data / "eval").glob("*.tar")) for s in iter_shard(shard)]
    images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples]
    return images, [s["txt"] for s in samples]
