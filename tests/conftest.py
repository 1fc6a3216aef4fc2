"""Shared fixtures: a tiny demo data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# One OpenMP thread per process unless the caller chose: the suite runs two pytest workers (xdist) and 2-rank
# torchrun jobs on 2 cores, where each process's default of one thread per core oversubscribes the cores and
# OpenMP's spinning threads wait on each other (a tiny step 0.1 s idle, 7 s contended). Set before any test
# module imports torch; subprocesses inherit it. Nothing under test depends on the thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Property tests: a modest number of examples; CI runs a fixed, derandomised set and keeps no database.
settings.register_profile("default", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")


LONG_MODULES = (
    "pretrain/test_strategies.py",
    "data_tools/test_ray.py",
    "test_bench_smoke.py",
    "pretrain/test_preemption.py",
    "pretrain/test_restart.py",
    "pretrain/test_remote_checkpoints.py",
    "pretrain/test_make_demo.py",
    "pretrain/test_slurm.py",
    "pretrain/test_data_pipeline.py",
    "pretrain/test_caption.py",
    "pretrain/test_distill.py",
    "pretrain/test_equivalence.py",
)
"""The modules of a minute or more (docs/PERFORMANCE.md, "The test suite"), longest first. They run first:
xdist hands out whole files in collection order, and one of them handed out last keeps one worker busy for
minutes while the other has nothing left to do."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    first = {name: rank for rank, name in enumerate(LONG_MODULES)}
    tests = Path(__file__).parent

    def rank(item: pytest.Item) -> int:
        return first.get(item.path.relative_to(tests).as_posix(), len(first))

    items.sort(key=rank)  # stable: every module keeps its tests' order, the rest keep theirs


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small procedural demo set: 512 train samples in 4 shards, 64 labelled eval samples."""
    from webshards.demo_data import write_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    write_demo_data(out, samples=512, eval_samples=64, samples_per_shard=128, workers=1)
    return out
