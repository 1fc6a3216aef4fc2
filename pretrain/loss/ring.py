"""Peer-to-peer hops around the ring of ranks, shared by the losses that pass feature blocks to their
neighbours instead of all-gathering them (SigLipLoss, ClipLoss with `ring=True`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.parallel.distributed import world


def exchange(tensor: torch.Tensor, send_to: int, recv_from: int) -> tuple[torch.Tensor, list]:
    """Start sending `tensor` to `send_to` and receiving a same-shaped block from `recv_from`.

    Returns the receive buffer and the works to wait on; the caller keeps `tensor` alive until then.
    """
    received = torch.empty_like(tensor)
    # One batch so that NCCL posts the send and the receive together (separately, every rank's send
    # would wait for its neighbour's receive, queued behind that neighbour's own send: a cycle).
    works = dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, tensor, send_to), dist.P2POp(dist.irecv, received, recv_from)]
    )
    return received, works


def ring_peers() -> tuple[int, int]:
    """(left, right) neighbours of this rank on the ring."""
    rank, size = world()
    return (rank - 1) % size, (rank + 1) % size


def pass_right(tensor: torch.Tensor) -> torch.Tensor:
    """Send `tensor` to the right neighbour and return the block that came from the left (blocking)."""
    left, right = ring_peers()
    sent = tensor.contiguous()
    received, works = exchange(sent, send_to=right, recv_from=left)
    for work in works:
        work.wait()
    return received
