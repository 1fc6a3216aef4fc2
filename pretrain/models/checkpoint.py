"""Checkpoints on disk: where they are (step folders, `latest`) and reading them safely.

Layout: `checkpoints/step_{N:08d}/` holds what the strategy writes (model, optimizer), `trainer.pt`
(step, samples seen, scheduler) and one `rank_{r:05d}.pt` per rank (RNG states and data position).
Those files hold only tensors and plain containers, and are read with `torch.load(weights_only=True)`:
a downloaded checkpoint cannot run code when `pretrain eval` / `export` / `resume` opens it.
Last, `_COMPLETE` lists every other file's size and CRC-32 (`webshards.publish.seal`, the manifest a remote
copy carries too); `verify_checkpoint` checks it before anything is read, so a truncated or corrupted file
is never loaded. `pretrain.training.state.CheckpointManager` writes them (atomically, keep-last-k) and
resumes them.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from pretrain.parallel.safe_load import safe_load
from webshards.publish import MARKER, check_files

log = logging.getLogger("pretrain")

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a `checkpoints/` folder, or a run directory."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            target = root / latest.read_text().strip()
            if not target.is_dir():
                raise FileNotFoundError(f"{latest} points to a missing checkpoint: {target}")
            return target
    if (p / "trainer.pt").is_file():
        return p
    raise FileNotFoundError(
        f"no checkpoint at {p} (expected a step_* folder or a run directory with checkpoints/latest)"
    )


class CheckpointError(ValueError):
    """A checkpoint whose files differ from its manifest (truncated, corrupted, missing): never loaded."""


def verify_checkpoint(folder: Path) -> None:
    """Check every file `folder/_COMPLETE` lists (sizes, then checksums) before any is read; a difference
    is a `CheckpointError`, one line naming the file and the reason. A folder without the manifest (saved
    before checkpoints carried one) is loaded as before, with a warning that it is unverified."""
    marker = folder / MARKER
    if not marker.is_file():
        log.warning(
            "%s has no %s manifest (saved by an older version): loading it unverified", folder, MARKER
        )
        return
    problem = check_files(folder, marker.read_bytes(), str(marker))
    if problem is not None:
        rel, reason = problem
        raise CheckpointError(f"{folder / rel}: {reason}; not loading checkpoint {folder.name}")


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.pt"


def rank_files(folder: Path) -> list[Path]:
    """The checkpoint's rank files, in rank order."""
    return sorted(folder.glob("rank_[0-9][0-9][0-9][0-9][0-9].pt"))


def load_trainer_state(folder: Path) -> dict:
    return safe_load(folder / "trainer.pt")
