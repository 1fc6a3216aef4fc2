"""Preemption and Ctrl-C: SIGUSR1 / SIGTERM / SIGINT end the run cleanly after the current step with a
checkpoint; a second SIGINT (Ctrl-C again) ends it at once.

A signal may reach only some ranks (torchrun does not forward SIGUSR1; a scheduler may signal one node),
so ranks agree through a tiny all_reduce(MAX) of the flag on a side gloo group: CPU-only, started
asynchronously after each step and read at the next one, so it never waits on the GPU (the stop lands one
step after the signal, on the same step on every rank). The flag says why: a scheduler's preemption
(SIGUSR1 / SIGTERM, the job is requeued) or a person's Ctrl-C (SIGINT, it is not); the larger wins.

A terminal's Ctrl-C reaches every process of its foreground group: a single-process run and its data
workers (which ignore it, pretrain/data/loader.py), or torchrun alone, whose ranks each run in a session of
their own (pretrain/torchrun.py passes it on).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

log = logging.getLogger("pretrain")

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""The scheduler's signals: stop with a checkpoint, then requeue. SIGINT (Ctrl-C) is handled apart: during
start-up it stops the run at once (Python's KeyboardInterrupt, one line from `pretrain`), which is what a
person pressing Ctrl-C there wants."""
PREEMPTED, INTERRUPTED = 1, 2
"""Why a stop was asked for, as the ranks' flag carries it: a preemption signal, or Ctrl-C."""
SECOND_CTRL_C = "second Ctrl-C: stopping now, without a checkpoint of the steps since the last one"
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

    def __init__(self, timeout: float | None = None) -> None:
        """`timeout`: seconds the flag exchange waits for the other ranks (`dist.timeout`; None: torch's
        default, 30 min for gloo), so that a hung rank fails this one too instead of stalling it here."""
        self.requested = PREEMPTED if _early else 0
        self.stop = 0  # what the ranks agreed on, once they did: PREEMPTED or INTERRUPTED
        if _early:
            log.warning(
                "got %s during start-up: stopping after the first step", signal.Signals(_early[0]).name
            )
            _early.clear()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            # an ignored SIGINT stays ignored: a shell starts background jobs so, to keep Ctrl-C from them
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        # torch only here (the trainer has loaded it): `catch_early` runs before the slow imports of start-up
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        wait = None if timeout is None else timedelta(seconds=timeout)
        self._group = dist.new_group(backend="gloo", timeout=wait) if distributed else None
        self._main = not distributed or dist.get_rank() == 0
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def _handle(self, signum: int, frame) -> None:
        self.requested = max(self.requested, PREEMPTED)
        log.warning("got %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def _interrupt(self, signum: int, frame) -> None:
        """Ctrl-C: the first stops after this step with a checkpoint; a second stops now. Each rank gets it,
        so only the main rank shows it (at WARNING; INFO, which other ranks do not print, elsewhere)."""
        if self.requested == INTERRUPTED:
            if self._main:
                print(SECOND_CTRL_C, file=sys.stderr, flush=True)
            os._exit(130)  # no clean-up that could wait on a collective; a half-written checkpoint stays .tmp
        self.requested = INTERRUPTED
        log.log(
            logging.WARNING if self._main else logging.INFO,
            "got SIGINT (Ctrl-C): stopping after this step with a checkpoint; press Ctrl-C again to stop now",
        )

    def should_stop(self) -> bool:
        """True once any rank was signalled (`stop` then says why); call it once per step on every rank."""
        if self._group is None:
            self.stop = self.requested
            return bool(self.stop)
        import torch
        import torch.distributed as dist

        self.stop = self._collect()
        if self.stop == INTERRUPTED and not self.requested and self._main:  # Ctrl-C on another rank only
            log.warning("another rank got SIGINT (Ctrl-C): stopping after this step with a checkpoint")
        flag = torch.tensor([self.requested], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flag)
        return bool(self.stop)

    def _collect(self) -> int:
        if self._pending is None:
            return 0
        work, flag = self._pending
        work.wait()
        self._pending = None
        return int(flag.item())

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
