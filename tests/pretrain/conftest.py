"""Fixtures the pretrain tests share: a briefly trained tiny-clip export with a labelled adaptation set."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import trained_tiny_clip


@pytest.fixture(scope="session")
def adapt_setup(tmp_path_factory) -> tuple[Path, Path]:
    """(export folder, adaptation set) for `pretrain adapt`: tiny-clip trained 30 steps on the demo's held-out
    domain (~7 s: its features score well above chance, so methods' predictions differ from class to class),
    exported; and 16 classes with 16 labelled train images and 8 test images each (`data-tools demo-data
    --adapt-samples`)."""
    from data_tools.cli import main as data_tools_main
    from pretrain.publish.export import export

    tmp = tmp_path_factory.mktemp("adapt")
    args = ["demo-data", "--output", str(tmp / "demo"), "--domain", "new", "--samples", "512"]
    args += [
        "--samples-per-shard",
        "128",
        "--eval-samples",
        "128",
        "--adapt-samples",
        "256",
        "--workers",
        "1",
    ]
    assert data_tools_main(args) == 0
    run = trained_tiny_clip(tmp, f"{tmp}/demo/train/{{00000..00003}}.tar", steps=30, batch_size=32)
    return export(run, tmp / "export"), tmp / "demo" / "adapt"
