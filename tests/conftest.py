"""Shared fixtures: a tiny demo data set."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small procedural demo set: 512 train samples in 4 shards, 64 labelled eval samples."""
    from data_tools.demo import write_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    write_demo_data(out, samples=512, eval_samples=64, samples_per_shard=128, workers=1)
    return out
