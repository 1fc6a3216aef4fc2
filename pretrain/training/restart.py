"""Automatic restart: workers that torchrun starts again after a failure (`--max-restarts`, launch/torchrun.sh
MAX_RESTARTS) continue the newest complete checkpoint of their run, as `resume=latest` would, unasked.

torchrun numbers its attempts in TORCHELASTIC_RESTART_COUNT (0: the first). An agent that restarts its workers
because another node's failed may count it as a membership change, not a restart, so the ranks agree on the
largest count. A first attempt keeps today's checks (a run directory with checkpoints and no `resume` is
refused); only when they pass does rank 0 write the launch's TORCHELASTIC_RUN_ID into `{run_dir}/.launch`. A
restart resumes on its own only where that file names its launch: a first start that was refused stays
refused however often torchrun tries again, instead of continuing somebody's earlier run.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.models.checkpoint import complete_checkpoints
from pretrain.parallel.distributed import world
from webshards.atomic import write_atomic

log = logging.getLogger("pretrain")

LAUNCH_FILE = ".launch"
"""In the run directory: the TORCHELASTIC_RUN_ID of the launch whose first attempt passed the checks."""


def restart_count(device: torch.device) -> int:
    """torchrun's restart count, the largest of any rank's (0 outside torchrun)."""
    count = torch.tensor([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))], device=device)
    if world()[1] > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def resume_after_restart(cfg: Config, is_main: bool, device: torch.device) -> Config:
    """`cfg`, or in a restarted attempt of a launch that got past the checks a copy with `resume=latest`
    (the newest complete checkpoint, local or at checkpoint.remote). A `resume` path stays the starting
    point until the run has a checkpoint of its own. Call it on every rank (it agrees on the count)."""
    count, launch = restart_count(device), cfg.run_dir / LAUNCH_FILE
    if count == 0:
        if is_main:  # an earlier launch's: this one's first attempt has not passed the checks yet
            launch.unlink(missing_ok=True)
        return cfg
    level = logging.WARNING if is_main else logging.INFO  # said once, by rank 0
    if cfg.resume != "latest":
        if not launch.is_file() or launch.read_text() != os.environ.get("TORCHELASTIC_RUN_ID"):
            log.log(level, "torchrun restart %d: this launch never got to train; not resuming unasked", count)
            return cfg
        if cfg.resume is not None and not complete_checkpoints(cfg.run_dir / "checkpoints"):
            return cfg  # no checkpoint of its own yet: start again from the given one
        cfg = dataclasses.replace(cfg, resume="latest")
    log.log(level, "torchrun restart %d: resuming the newest checkpoint", count)
    return cfg


def record_launch(cfg: Config) -> None:
    """Rank 0, once the run directory's checks passed: restarts of this launch may resume on their own."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        write_atomic(cfg.run_dir / LAUNCH_FILE, run_id.encode())
