"""Run by test_tiled_loss.py in a fresh process: peak extra memory and time of ClipLoss forward+backward at
each of several global batches, one after another.

torch's CPU tensors come from its own allocator (posix_memalign/mmap), which tracemalloc, hooked into
Python's allocator, never sees. So the peak is the kernel's resident-set high-water mark (VmHWM): reset to
the current RSS just before the loss (`/proc/self/clear_refs` 5), read after backward, minus the RSS at the
reset. It includes the feature gradients (alive at the end) and every block the loss touched. glibc is
told to map every block of 64 KiB or more on its own (M_MMAP_THRESHOLD), so that a freed block leaves the
RSS at once instead of staying in the heap, where reuse and fragmentation would blur the figure; that is
also what lets one process measure several sizes: each size's tensors are freed before the next reset.
Prints one JSON line per size.

    python tests/pretrain/loss_memory_worker.py DIM CHUNK BATCH [BATCH ...]
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.loss import ClipLoss


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _features(batch: int, dim: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    return img, txt, torch.tensor(100.0, requires_grad=True)


def measure(loss_fn: ClipLoss, batch: int, dim: int) -> dict:
    """One forward + backward; every tensor it made is freed on return."""
    img, txt, scale = _features(batch, dim)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = loss_fn(img, txt, scale)
    loss.backward()
    seconds = time.perf_counter() - start
    extra = (_status_kib("VmHWM") - before) * 1024
    grads = 4 * (img.grad.numel() + txt.grad.numel())
    return {
        "batch": batch,
        "extra_bytes": extra,
        "grad_bytes": grads,
        "seconds": seconds,
        "loss": loss.item(),
    }


def main(dim: str, chunk: str, *batches: str) -> None:
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # -3: M_MMAP_THRESHOLD
    loss_fn = ClipLoss(chunk_size=int(chunk))
    warm = _features(2 * int(chunk), int(dim))  # threads, kernels and allocator pools exist before the reset
    loss_fn(*warm).backward()
    for batch in batches:
        print(json.dumps(measure(loss_fn, int(batch), int(dim))), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
