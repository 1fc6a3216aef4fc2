"""ClipLoss: equals open_clip's, chunking changes nothing, and gathering across ranks is exact."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
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


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, txt, scale = features()
    n = img.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    i, t, s = (
        img[mine].clone().requires_grad_(),
        txt[mine].clone().requires_grad_(),
        scale.clone().requires_grad_(),
    )
    loss = ClipLoss(chunk_size=5)(i, t, s)
    loss.backward()
    # DDP averages parameter gradients over ranks; do the same for the scale.
    dist.all_reduce(s.grad)
    queue.put((rank, loss.item(), i.grad, t.grad, s.grad / world))
    dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_single_process():
    """W ranks with local rows vs all columns == one process on the concatenated batch."""
    world = 2
    img, txt, scale = features()
    i, t, s = (x.clone().requires_grad_() for x in (img, txt, scale))
    ref = ClipLoss()(i, t, s)
    ref.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29000 + os.getpid() % 1000
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    n = img.shape[0] // world
    mean_loss = sum(r[1] for r in results) / world
    assert abs(mean_loss - ref.item()) < 1e-10
    # The gradient of the mean over ranks w.r.t. each rank's features is its slice of d(ref)/d(features) * W.
    for rank, _, gi, gt, gs in results:
        torch.testing.assert_close(gi / world, i.grad[rank * n : (rank + 1) * n])
        torch.testing.assert_close(gt / world, t.grad[rank * n : (rank + 1) * n])
        torch.testing.assert_close(gs, s.grad)
