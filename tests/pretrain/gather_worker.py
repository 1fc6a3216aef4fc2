"""Run under torchrun by test_loss.py: each rank computes ClipLoss on its slice and saves loss and grads."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pretrain.loss import ClipLoss


def main(features_file: str, out_prefix: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    img, txt, scale = torch.load(features_file)
    n = img.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    i, t, s = (
        img[mine].clone().requires_grad_(),
        txt[mine].clone().requires_grad_(),
        scale.clone().requires_grad_(),
    )
    loss = ClipLoss(chunk_size=5)(i, t, s)
    loss.backward()
    dist.all_reduce(s.grad)  # DDP averages parameter gradients over ranks; do the same for the scale
    torch.save((loss.detach(), i.grad, t.grad, s.grad / world), f"{out_prefix}{rank}.pt")
    dist.barrier()  # a rank tearing gloo down while its peer still sends aborts ("terminate called ...")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
