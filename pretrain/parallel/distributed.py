"""Process topology from torchrun or SLURM, process-group setup, and collectives with autograd."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from webshards.ranks import Ranks, ranks_from_env

log = logging.getLogger("pretrain")


@dataclass(frozen=True)
class DistInfo(Ranks):
    """This process's `Ranks` and where rank 0 listens for the process group."""

    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist; `scontrol` knows every syntax, the regex covers `node[1-4,7]`."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
        return m.group(1) + (m.group(2) or "") if m else "127.0.0.1"


def detect(env: dict | None = None) -> DistInfo:
    """Rank, local rank, world size and master from torchrun's variables, else SLURM's, else one process."""
    env = os.environ if env is None else env
    ranks = ranks_from_env(env)
    if not ranks.launcher:
        return DistInfo()
    master = env.get("MASTER_ADDR")
    if ranks.launcher == "slurm" and not master:
        master = _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    port = int(env.get("MASTER_PORT", DistInfo.master_port))
    return DistInfo(**vars(ranks), master_addr=master or DistInfo.master_addr, master_port=port)


def select_device(requested: str, info: DistInfo) -> torch.device:
    """`auto` picks this process's GPU (by local rank) when there is one, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    torch.cuda.set_device(info.local_rank)
    return torch.device("cuda", info.local_rank)


def init_distributed(
    info: DistInfo, device: torch.device, backend: str = "auto", timeout: float | None = None
) -> bool:
    """Join the process group (NCCL on GPU, gloo on CPU) when there is more than one process; True when
    this call created it (its caller shuts it down), False when there was one already or none is needed.
    `timeout`: seconds a collective waits for the others before it fails (None: torch's default)."""
    if not info.distributed or dist.is_initialized():
        return False
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", str(info.master_port))
    wait = None if timeout is None else timedelta(seconds=timeout)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world, timeout=wait)
    log.debug("joined process group: rank %d/%d backend %s", info.rank, info.world, backend)
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# Renamed in recent torch; the old names still work back to torch 2.4.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Written out rather than `torch.distributed.nn.all_gather` so that the backward uses one collective
    that every backend has (reduce_scatter on NCCL, all_reduce elsewhere: gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.n = rank, tensor.shape[0]
        out = tensor.new_empty((size * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            local = grad.new_empty((ctx.n, *grad.shape[1:]))
            _reduce_scatter_single(local, grad)
            return local
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0 (rank order); gradients flow back to each rank."""
    if world()[1] == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); identity without a process group."""
    if world()[1] == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / world()[1]


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` without a process group."""
    if world()[1] == 1:
        return [obj]
    out: list = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
