"""Overlap of the host-to-device copy with the step: the next micro-batch is fetched and copied to the GPU on
a side CUDA stream while the current step's kernels run.

`DevicePrefetcher` wraps any data source (`next_batch`, `state_dict`, `load_state_dict`, `close`). It keeps
one batch ahead: each `next_batch()` hands out the batch fetched by the previous call (the compute stream
first waits for its copy, and each tensor is marked as used by the compute stream so the allocator does not
reuse its memory early) and starts fetching the following one. Exact resume: the batch held ahead has been
read from the source but not trained on, so `state_dict()` is the source's state from *before* that read,
and a resumed run reads it again. The source's other attributes (e.g. `skipped`) are passed through; they
may count the batch held ahead, and an error reading that batch surfaces one step early. On CPU it is a
pass-through (no stream, no lookahead).
"""

from __future__ import annotations

import contextlib

import torch

Batch = tuple[torch.Tensor, ...]


class DevicePrefetcher:
    """A data source whose batches arrive on `device`, the next one copied on a side stream (CUDA)."""

    def __init__(self, source, device: torch.device, ahead: bool | None = None) -> None:
        """`ahead`: keep one batch ahead (default: on CUDA only); the side stream exists on CUDA only."""
        self.source, self.device = source, torch.device(device)
        cuda = self.device.type == "cuda"
        self.ahead = cuda if ahead is None else ahead
        self.stream = torch.cuda.Stream(self.device) if cuda and self.ahead else None
        self._pending: tuple[Batch, dict] | None = None  # (the batch ahead, the source state before it)

    def __getattr__(self, name: str):
        if name in ("source", "_pending"):  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.stream is not None and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()  # an asynchronous copy needs page-locked memory
        return tensor.to(self.device, non_blocking=True)

    def _fetch(self) -> tuple[Batch, dict]:
        """The source's next batch on the device (its device-side finishing too, on the side stream), and
        the source's state before it was read."""
        state = self.source.state_dict()
        on_side = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with on_side:
            batch = tuple(self._copy(t) for t in self.source.next_batch())
        return batch, state

    def next_batch(self) -> Batch:
        if not self.ahead:
            return tuple(self._copy(t) for t in self.source.next_batch())
        if self._pending is None:
            self._pending = self._fetch()
        batch, _ = self._pending
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)  # the copy (and finishing) of this batch is done first
            for tensor in batch:
                tensor.record_stream(compute)  # its memory is not reused while the step still reads it
        self._pending = self._fetch()
        return batch

    def state_dict(self) -> dict:
        """The source's state as of the batches handed out (the batch held ahead is read again on resume)."""
        return self._pending[1] if self._pending is not None else self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._pending = None
        self.source.load_state_dict(state)

    def close(self) -> None:
        self._pending = None
        self.source.close()
