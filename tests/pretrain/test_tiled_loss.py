"""The O(B)-memory ClipLoss (`chunk_size`): equals open_clip's ClipLoss and the plain loss in value and
gradients for any chunk size, 1 and 2 ranks, all-gathered or ring; its memory grows linearly with the batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import torchrun
from open_clip.loss import ClipLoss as OpenClipLoss

from pretrain.loss import ClipLoss

WORLD = 2
CHUNKS = [1, 4, 5, 13, 64]  # local batch 13: chunks below, equal to and above it, dividing it or not


def features(n: int, d: int = 16, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype), torch.tensor(14.3, dtype=dtype)


def loss_and_grads(loss_fn, img, txt, scale) -> tuple[torch.Tensor, ...]:
    i, t, s = (x.clone().requires_grad_() for x in (img, txt, scale))
    loss = loss_fn(i, t, s)
    loss.backward()
    return loss.detach(), i.grad, t.grad, s.grad


def assert_all_close(ours, ref, rtol: float) -> None:
    """Each tensor within `rtol` of the reference, relative to the reference's largest entry for entries
    near zero (an fp32 gradient that cancels to ~1e-3 of its neighbours keeps only their absolute error)."""
    for name, a, b in zip(("loss", "d image", "d text", "d scale"), ours, ref):
        atol = rtol * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_one_rank_equals_open_clip_and_plain(chunk):
    img, txt, scale = features(26)
    ours = loss_and_grads(ClipLoss(chunk_size=chunk), img, txt, scale)
    assert_all_close(ours, loss_and_grads(OpenClipLoss(), img, txt, scale), rtol=1e-5)
    img, txt, scale = features(
        26, dtype=torch.float64
    )  # fp64: any difference is the algorithm's, not rounding
    ours = loss_and_grads(ClipLoss(chunk_size=chunk), img, txt, scale)
    assert_all_close(ours, loss_and_grads(ClipLoss(), img, txt, scale), rtol=1e-12)


def test_large_logits_stay_finite_and_exact():
    """Scale 100 (open_clip's clamp) on aligned features: logits near 100 must not overflow the exps."""
    img, txt, _ = features(40, d=4)
    scale = torch.tensor(100.0)
    ours = loss_and_grads(ClipLoss(chunk_size=6), img, txt, scale)
    assert_all_close(ours, loss_and_grads(OpenClipLoss(), img, txt, scale), rtol=1e-5)


def test_ring_needs_a_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        ClipLoss(ring=True)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """One torchrun of 2 ranks over every (chunk, mode) case; the batch is saved in fp32."""
    tmp = tmp_path_factory.mktemp("tiled")
    torch.save(features(WORLD * 13), tmp / "features.pt")
    cases = [f"{chunk}:{mode}" for chunk in CHUNKS for mode in ("gather", "ring")]
    worker = Path(__file__).with_name("tiled_loss_worker.py")
    proc = torchrun(WORLD, [str(worker), str(tmp / "features.pt"), str(tmp / "rank"), *cases])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("mode", ["gather", "ring"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_two_ranks_equal_open_clip_on_the_whole_batch(two_rank_results, chunk, mode):
    """W ranks x 13 rows == open_clip's ClipLoss in one process on the concatenated batch: the mean of the
    ranks' losses is its loss, each rank's feature gradients are W x its slice of the full gradient (rank
    order; DDP averages parameter gradients), and the ranks' mean scale gradient is the full one."""
    img, txt, scale = features(WORLD * 13)
    ref_loss, ref_img, ref_txt, ref_scale = loss_and_grads(OpenClipLoss(), img, txt, scale)
    results = [r[f"{chunk}:{mode}"] for r in two_rank_results]
    mean_loss = sum(r[0] for r in results) / WORLD
    scale_grads = [r[3] for r in results]
    assert all(torch.equal(g, scale_grads[0]) for g in scale_grads)  # all-reduced: the same on every rank
    ours = (
        mean_loss,
        torch.cat([r[1] for r in results]) / WORLD,
        torch.cat([r[2] for r in results]) / WORLD,
        scale_grads[0],
    )
    assert_all_close(ours, (ref_loss, ref_img, ref_txt, ref_scale), rtol=1e-5)


MEMORY_DIM, MEMORY_CHUNK = 512, 256
MEMORY_BATCHES = (1024, 2048, 4096)


@pytest.fixture(scope="module")
def peak_extra_memory() -> dict[int, dict]:
    """Peak extra RSS of forward+backward at each of MEMORY_BATCHES, measured one after another in one fresh
    process (tests/pretrain/loss_memory_worker.py says why RSS and not tracemalloc, and why one process can
    measure several sizes: the figures equal those of a process per size to 1%)."""
    worker = Path(__file__).with_name("loss_memory_worker.py")
    sizes = [str(b) for b in MEMORY_BATCHES]
    out = subprocess.run(
        [sys.executable, str(worker), str(MEMORY_DIM), str(MEMORY_CHUNK), *sizes],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {row["batch"]: row for row in map(json.loads, out.stdout.splitlines())}


def test_memory_grows_linearly_small(peak_extra_memory):
    """The plain loss's logits alone would grow 4x per doubling of the batch; the tiled loss's extra memory
    ~2x, and the feature gradients are part of the measured peak."""
    for small, large in zip(MEMORY_BATCHES, MEMORY_BATCHES[1:]):
        small, large = peak_extra_memory[small], peak_extra_memory[large]
        assert large["extra_bytes"] <= 2.1 * small["extra_bytes"], (small, large)
    for row in peak_extra_memory.values():
        assert row["extra_bytes"] >= row["grad_bytes"], row


def test_memory_within_the_32k_budget_scaled_down(peak_extra_memory):
    """Issue 14's bound, 0.35 GiB of extra memory (gradients included) at global batch 32,768, dim 512,
    scaled with the batch: 4,096 rows (chunk 256, 1/8 of 32k's 2048) within 1/8 of it, 44.8 MiB, where the
    plain 4,096 x 4,096 logits alone take 64 MiB. The 32k figure itself is bench/loss_memory.py's
    (docs/PERFORMANCE.md: 0.195 GiB)."""
    largest = peak_extra_memory[MEMORY_BATCHES[-1]]
    assert largest["extra_bytes"] <= 0.35 * 2**30 * MEMORY_BATCHES[-1] / 32768, largest


def test_loss_memory_bench_small_mode_runs():
    """bench/loss_memory.py --small (the smoke run that keeps the script from rotting): a table row per size."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "loss_memory.py"
    out = subprocess.run([sys.executable, str(bench), "--small"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.split("|")[0].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [256, 512, 1024]
    assert all("MiB" in row[1] and "MiB" in row[2] for row in rows), out.stdout
