"""Atomic, strategy-aware checkpoints with a `latest` pointer and keep-last-k pruning.

Layout: `checkpoints/step_{N:08d}/` holds what the strategy writes (model, optimizer), `trainer.pt`
(step, samples seen, scheduler) and one `rank_{r:05d}.pt` per rank (RNG states and data position).
Those files hold only tensors and plain containers, and are read with `torch.load(weights_only=True)`:
a downloaded checkpoint cannot run code when `pretrain eval` / `export` / `resume` opens it.
Everything is written into `step_N.tmp/` first; the folder is renamed only when every rank is done, and
only then does `latest` move, so a crash at any point leaves the previous checkpoint intact and current.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pretrain.parallel.distributed import barrier
from pretrain.parallel.safe_load import safe_load
from webshards.atomic import write_atomic

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _numpy_state() -> dict:
    """numpy's global RNG state as plain values (a numpy array is not allowed by weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def _set_numpy_state(state: dict) -> None:
    keys = np.asarray(state["keys"], dtype=np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached"]))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save_checkpoint(ckpt_root: Path, step: int, write_shared, rank_state: dict, rank: int, keep: int) -> Path:
    """Write a checkpoint atomically from every rank.

    `write_shared(folder)` writes the strategy's files and `trainer.pt` (it decides which ranks write);
    `rank_state` is this rank's private state.
    """
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / (final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write_shared(tmp)
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(ckpt_root / "latest", final.name.encode())
        _prune(ckpt_root, keep)
    barrier()
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    for old in complete_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_rank_state(folder: Path, rank: int) -> dict:
    path = folder / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} missing: this checkpoint was saved with fewer ranks than the current run"
        )
    return safe_load(path)


def load_trainer_state(folder: Path) -> dict:
    return safe_load(folder / "trainer.pt")
