"""ClipLoss: equals open_clip's, chunking changes nothing, and gathering across ranks is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import torchrun
from open_clip.loss import ClipLoss as OpenClipLoss

from pretrain.loss import ClipLoss


def features(n: int = 24, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt, torch.tensor(14.3, dtype=torch.float64)


def test_equals_open_clip_loss():
    img, txt, scale = features()
    ours = ClipLoss()(img.float(), txt.float(), scale.float())
    ref = OpenClipLoss()(img.float(), txt.float(), scale.float())
    assert abs(ours.item() - ref.item()) < 1e-6


@pytest.mark.parametrize("chunk", [1, 5, 24, 100])
def test_chunked_equals_full_in_value_and_gradient(chunk):
    img, txt, scale = features()
    grads = []
    for loss_fn in (ClipLoss(), ClipLoss(chunk_size=chunk)):
        i, t, s = (x.clone().requires_grad_() for x in (img, txt, scale))
        loss = loss_fn(i, t, s)
        loss.backward()
        grads.append((loss.detach(), i.grad, t.grad, s.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        ClipLoss(chunk_size=0)


def test_gathered_loss_and_gradients_equal_single_process(tmp_path):
    """W ranks with local rows vs all columns == one process on the concatenated batch."""
    world = 2
    img, txt, scale = features()
    torch.save((img, txt, scale), tmp_path / "features.pt")
    worker = Path(__file__).with_name("gather_worker.py")
    proc = torchrun(world, [str(worker), str(tmp_path / "features.pt"), str(tmp_path / "rank")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    i, t, s = (x.clone().requires_grad_() for x in (img, txt, scale))
    ref = ClipLoss()(i, t, s)
    ref.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    n = img.shape[0] // world
    assert abs(sum(r[0].item() for r in results) / world - ref.item()) < 1e-10
    # The gradient of the mean over ranks w.r.t. each rank's features is its slice of d(ref)/d(features) * W.
    for rank, (_, gi, gt, gs) in enumerate(results):
        torch.testing.assert_close(gi / world, i.grad[rank * n : (rank + 1) * n])
        torch.testing.assert_close(gt / world, t.grad[rank * n : (rank + 1) * n])
        torch.testing.assert_close(gs, s.grad)


def test_forked_ranks_get_torchruns_variables_and_a_failed_rank_ends_the_job(tmp_path):
    """The launcher of the 2-rank tests (tests/forked_ranks.py) against what torchrun does: every rank sees
    RANK / WORLD_SIZE / MASTER_* and its arguments; one rank's failure ends the other at once and fails the job
    with that rank's stderr."""
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys, time\n"
        "rank = int(os.environ['RANK'])\n"
        "print(rank, os.environ['WORLD_SIZE'], os.environ['LOCAL_RANK'], os.environ['MASTER_ADDR'], sys.argv[1:])\n"
        "if sys.argv[1] == 'fail':\n"
        "    time.sleep(600) if rank == 0 else sys.exit('rank 1 gives up')\n"
    )
    proc = torchrun(2, [str(script), "ok"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [f"{r} 2 {r} 127.0.0.1 ['ok']" for r in (0, 1)]
    proc = torchrun(2, [str(script), "fail"], timeout=60)
    assert proc.returncode == 1 and "rank 1 gives up" in proc.stderr


def test_against_open_clip_local_loss_and_gather_with_grad_flags(tmp_path):
    """open_clip_train's `--local-loss` / `--gather-with-grad` (open_clip's ClipLoss) against ours on 2 gloo
    ranks, per rank: ours is `--local-loss --gather-with-grad` exactly (loss and feature gradients);
    `--gather-with-grad` alone has the same gradients, the global loss on every rank (the mean of ours);
    without `--gather-with-grad` the gradients are 1/W of ours (the defaults) or differ (`--local-loss`)."""
    world = 2
    torch.save(features(), tmp_path / "features.pt")
    worker = Path(__file__).with_name("clip_loss_flags_worker.py")
    proc = torchrun(world, [str(worker), str(tmp_path / "features.pt"), str(tmp_path / "rank")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    mean_loss = sum(r["ours"][0] for r in results) / world
    for r in results:
        ours = r["ours"]
        for a, b in zip(r["local+grad"], ours):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["grad"][0], mean_loss)
        torch.testing.assert_close(r["grad"][1:], ours[1:])
        torch.testing.assert_close(r["none"][0], mean_loss)
        torch.testing.assert_close(r["none"][1:], tuple(g / world for g in ours[1:]))
        assert not torch.allclose(r["local"][1], ours[1])
