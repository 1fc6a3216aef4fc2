"""Run under torchrun by test_siglip.py: each rank computes SigLipLoss on its slice of the batch (texts
of the other ranks arriving around the ring) and saves its loss and gradients."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pretrain.loss import SigLipLoss


def main(features_file: str, out_prefix: str, chunk_size: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    img, txt, scale, bias = torch.load(features_file)
    n = img.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    i, t = img[mine].clone().requires_grad_(), txt[mine].clone().requires_grad_()
    s, b = scale.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = SigLipLoss(chunk_size=int(chunk_size) or None)(i, t, s, b)
    loss.backward()
    for grad in (s.grad, b.grad):  # DDP averages parameter gradients over ranks; do the same here
        dist.all_reduce(grad)
        grad /= world
    torch.save((loss.detach(), i.grad, t.grad, s.grad, b.grad), f"{out_prefix}{rank}.pt")
    dist.barrier()  # a rank tearing gloo down while its peer still sends aborts ("terminate called ...")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
