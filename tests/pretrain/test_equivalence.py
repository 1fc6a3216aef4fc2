"""W ranks x batch B == 1 rank x batch W*B (and the same with gradient accumulation): same loss at every
step, same parameters at the end. This is what gathering negatives with gradients guarantees."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import TINY, read_jsonl, run_cmd, torchrun
from safetensors.torch import load_file

STEPS = 5


def train(
    tmp: Path,
    name: str,
    nproc: int,
    batch: int,
    accum: int = 1,
    model: str = "tiny-clip",
    steps: int = STEPS,
    extra: tuple[str, ...] = (),
) -> Path:
    args = [
        "-m", "pretrain.train", "--config", str(TINY), f"run.dir={tmp}", f"run.name={name}",
        f"train.steps={steps}", f"train.batch_size={batch}", f"train.accum_steps={accum}",
        "log.every=1", "data.train=synthetic", "train.precision=fp32", f"model.name={model}", *extra,
    ]  # fmt: skip
    proc = torchrun(nproc, args) if nproc > 1 else run_cmd([sys.executable, *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / name


def compare(a: Path, b: Path, keys: tuple[str, ...] = ("loss",), steps: int = STEPS) -> None:
    for key in keys:
        la = [r[key] for r in read_jsonl(a / "metrics.jsonl") if "loss" in r]
        lb = [r[key] for r in read_jsonl(b / "metrics.jsonl") if "loss" in r]
        assert len(la) == len(lb) == steps
        for step, (x, y) in enumerate(zip(la, lb), 1):
            assert abs(x - y) / abs(y) < 1e-4, f"step {step}: {key} {x} vs {y}"
    final = f"checkpoints/step_{steps:08d}/model.safetensors"
    pa, pb = load_file(a / final), load_file(b / final)
    for k in pa:
        worst = (pa[k] - pb[k]).abs().max().item()
        assert worst < 1e-5, f"max difference of {k}: {worst}"


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


COCA_PARTS = ("loss", "loss_contrastive", "loss_caption")
COCA_STEPS = 3
# AdamW moves a weight whose gradient g is far below train.eps by about lr * g / eps, a gain of 1e3 at the
# default eps 1e-6 and lr 1e-3. Of the ~6400 token-embedding entries a step touches (median |g| 4e-3) a few
# have |g| ~ 1e-8, where fp32 sums taken in another order (2 ranks x 4 vs 1 x 8) differ by ~1e-8: with eps 1e-6,
# text.token_embedding.weight drifted 1.1e-5 in 3 steps, everything else < 1e-6. The same runs in float64
# agree to 1e-14 in every tensor: no real discrepancy. eps 1e-5 (gain 100) changes the update only of entries
# with |g| below ~1e-5 (about 14 of the 6400 per step); all tensors then agree within 1e-6.
COCA_ARGS = ("train.eps=1e-5",)


@pytest.fixture(scope="module")
def coca_reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coca-ref")
    return train(root, "coca-b8", 1, 8, model="tiny-coca", steps=COCA_STEPS, extra=COCA_ARGS)


@pytest.mark.parametrize("nproc, batch, accum", [(2, 4, 1), (1, 4, 2)])
def test_coca_split_batches_train_like_the_full_batch(coca_reference, tmp_path, nproc, batch, accum):
    """Both CoCa parts and the weights: the caption loss over the step's global token count."""
    name = f"coca-{nproc}x{batch}-a{accum}"
    run = train(tmp_path, name, nproc, batch, accum, "tiny-coca", COCA_STEPS, COCA_ARGS)
    compare(run, coca_reference, COCA_PARTS, COCA_STEPS)


def test_two_ranks_equal_one_rank_double_batch(reference, tmp_path):
    compare(train(tmp_path, "two-ranks-b8", nproc=2, batch=8), reference)


def test_two_ranks_with_accumulation_equal_one_rank(reference, tmp_path):
    compare(train(tmp_path, "two-ranks-b4-accum2", nproc=2, batch=4, accum=2), reference)


def test_accumulation_equals_larger_batch(reference, tmp_path):
    compare(train(tmp_path, "one-rank-b8-accum2", nproc=1, batch=8, accum=2), reference)
