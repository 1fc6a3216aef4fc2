"""Run on 2 gloo ranks by test_loss.py: on its slice of the batch, each rank takes our ClipLoss and open_clip's
ClipLoss under each setting of open_clip_train's `--local-loss` / `--gather-with-grad`, and saves the loss and
the gradients of its own features for each to `{argv[2]}{rank}.pt`."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss as OpenClipLoss

from pretrain.loss import ClipLoss

FLAGS = {"local+grad": (True, True), "grad": (False, True), "local": (True, False), "none": (False, False)}


def loss_and_grads(loss_fn, img, txt, scale) -> tuple[torch.Tensor, ...]:
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = loss_fn(i, t, scale)
    loss.backward()
    return loss.detach(), i.grad, t.grad


def main(features_file: str, out_prefix: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    img, txt, scale = torch.load(features_file)
    n = img.shape[0] // world
    mine = img[rank * n : (rank + 1) * n], txt[rank * n : (rank + 1) * n]
    results = {"ours": loss_and_grads(ClipLoss(), *mine, scale)}
    for name, (local, grad) in FLAGS.items():
        theirs = OpenClipLoss(local_loss=local, gather_with_grad=grad, rank=rank, world_size=world)
        results[name] = loss_and_grads(theirs, *mine, scale)
    torch.save(results, f"{out_prefix}{rank}.pt")
    dist.barrier()  # a rank tearing gloo down while its peer still sends aborts
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
