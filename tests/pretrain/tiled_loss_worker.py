"""Run under torchrun by test_tiled_loss.py: each rank computes the tiled ClipLoss on its slice of the batch,
for every (chunk size, ring) case given, and saves its loss and gradients per case."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pretrain.loss import ClipLoss


def run_case(img, txt, scale, chunk: int, ring: bool) -> tuple[torch.Tensor, ...]:
    rank, world = dist.get_rank(), dist.get_world_size()
    n = img.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    i, t = img[mine].clone().requires_grad_(), txt[mine].clone().requires_grad_()
    s = scale.clone().requires_grad_()
    loss = ClipLoss(chunk_size=chunk, ring=ring)(i, t, s)
    loss.backward()
    dist.all_reduce(s.grad)  # DDP averages parameter gradients over ranks; do the same for the scale
    return loss.detach(), i.grad, t.grad, s.grad / world


def main(features_file: str, out_prefix: str, *cases: str) -> None:
    """`cases`: `CHUNK:ring` or `CHUNK:gather`."""
    dist.init_process_group("gloo")
    img, txt, scale = torch.load(features_file)
    results = {}
    for case in cases:
        chunk, mode = case.split(":")
        results[case] = run_case(img, txt, scale, int(chunk), mode == "ring")
    torch.save(results, f"{out_prefix}{dist.get_rank()}.pt")
    dist.barrier()  # a rank tearing gloo down while its peer still sends aborts ("terminate called ...")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
