"""W ranks x batch B == 1 rank x batch W*B (and the same with gradient accumulation): same loss at every
step, same parameters at the end. This is what gathering negatives with gradients guarantees."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import TINY, read_jsonl, run_cmd, torchrun
from safetensors.torch import load_file

STEPS = 5


def train(tmp: Path, name: str, nproc: int, batch: int, accum: int = 1, model: str = "tiny-clip") -> Path:
    args = [
        "-m", "pretrain.train", "--config", str(TINY), f"run.dir={tmp}", f"run.name={name}",
        f"train.steps={STEPS}", f"train.batch_size={batch}", f"train.accum_steps={accum}",
        "log.every=1", "data.train=synthetic", "train.precision=fp32", f"model.name={model}",
    ]  # fmt: skip
    proc = torchrun(nproc, args) if nproc > 1 else run_cmd([sys.executable, *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / name


def compare(a: Path, b: Path) -> None:
    la = [r["loss"] for r in read_jsonl(a / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(b / "metrics.jsonl") if "loss" in r]
    assert len(la) == len(lb) == STEPS
    for step, (x, y) in enumerate(zip(la, lb), 1):
        assert abs(x - y) / abs(y) < 1e-4, f"step {step}: loss {x} vs {y}"
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    pa, pb = load_file(a / final), load_file(b / final)
    worst = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert worst < 1e-5, f"max parameter difference {worst}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("ref"), "one-rank-b16", nproc=1, batch=16)


@pytest.fixture(scope="module")
def siglip_reference(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("siglip-ref"), "siglip-b16", nproc=1, batch=16, model="tiny-siglip")


def test_siglip_two_ranks_with_accumulation_equal_one_rank(siglip_reference, tmp_path):
    """The sigmoid loss with texts passed around the ring, and accumulation, trains like the full batch."""
    run = train(tmp_path, "siglip-two-ranks-b4-accum2", nproc=2, batch=4, accum=2, model="tiny-siglip")
    compare(run, siglip_reference)
    assert all("loss_contrastive" in r for r in read_jsonl(run / "metrics.jsonl"))


def test_two_ranks_equal_one_rank_double_batch(reference, tmp_path):
    compare(train(tmp_path, "two-ranks-b8", nproc=2, batch=8), reference)


def test_two_ranks_with_accumulation_equal_one_rank(reference, tmp_path):
    compare(train(tmp_path, "two-ranks-b4-accum2", nproc=2, batch=4, accum=2), reference)


def test_accumulation_equals_larger_batch(reference, tmp_path):
    compare(train(tmp_path, "one-rank-b8-accum2", nproc=1, batch=8, accum=2), reference)
