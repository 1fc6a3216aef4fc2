"""Preemption: SIGUSR1 / SIGTERM end the run cleanly after the current step with a checkpoint.

A signal may reach only some ranks (torchrun does not forward SIGUSR1; a scheduler may signal one node),
so ranks agree through a tiny all_reduce(MAX) of the flag on a side gloo group: CPU-only, started
asynchronously after each step and read at the next one, so it never waits on the GPU (the stop lands one
step after the signal, on the same step on every rank).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

log = logging.getLogger("pretrain")

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_early: list[int] = []  # signals caught by catch_early() before the trainer's Preemption existed


def catch_early() -> None:
    """Catch the preemption signals from process start: one that lands during start-up (imports, model
    build, opening shards) is kept for the trainer, which checkpoints after its first step and requeues,
    instead of killing the process by the default action with no checkpoint and no requeue."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, lambda signum, frame: _early.append(signum))


class Preemption:
    """Catches the preemption signals and answers `should_stop()` identically on every rank."""

    def __init__(self) -> None:
        self.requested = bool(_early)
        if _early:
            log.warning(
                "got %s during start-up: stopping after the first step", signal.Signals(_early[0]).name
            )
            _early.clear()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        # torch only here (the trainer has loaded it): `catch_early` runs before the slow imports of start-up
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo") if distributed else None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def _handle(self, signum: int, frame) -> None:
        self.requested = True
        log.warning("got %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def should_stop(self) -> bool:
        """True once any rank was signalled; call it once per step on every rank."""
        if self._group is None:
            return self.requested
        import torch
        import torch.distributed as dist

        decided = self._collect()
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flag)
        return decided

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        work.wait()
        self._pending = None
        return bool(flag.item())

    def close(self) -> None:
        """Finish the flag exchange in flight and restore the previous signal handlers."""
        self._collect()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def requeue_slurm_job(env: dict | None = None) -> bool:
    """Under SLURM, put this job back in the queue (`scontrol requeue`); the next run passes resume=latest."""
    job = (os.environ if env is None else env).get("SLURM_JOB_ID")
    if not job:
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True
