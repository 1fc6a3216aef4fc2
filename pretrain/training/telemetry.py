"""What a training log line measures beyond the loss: time per step, the share of it spent waiting for
data, peak memory and MFU (model FLOPs utilisation). Everything here runs on the host; device values are
read only on log steps."""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """The process's peak memory so far and what it measures: CUDA's max allocated bytes of `device`
    (tensors only, not the allocator's cache) on GPU, the process's max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "cpu_max_rss"


class IntervalMeter:
    """Host-side timing of one log interval: wall time, steps, and time spent waiting for batches.

    Only `time.perf_counter` is read in the step, so measuring costs no device sync; the sync on the log
    step (the loss `.item()`) makes the interval's wall time cover the device work it queued.
    """

    def __init__(self, step: int = 0) -> None:
        self.restart(step)

    def restart(self, step: int) -> None:
        """Start a new interval after `step` (after a log line, an eval, or at the start of training)."""
        self.started, self.start_step, self.data_wait = time.perf_counter(), step, 0.0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def summary(self, step: int) -> dict:
        """`step_time` (mean seconds per step), `data_wait` (fraction) and the step count since the start."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        steps = max(step - self.start_step, 1)
        return {
            "steps": steps,
            "elapsed": elapsed,
            "step_time": elapsed / steps,
            "data_wait": self.data_wait / elapsed,
        }
