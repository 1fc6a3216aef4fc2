"""This process's place among its peers, from the launcher's environment: torchrun's ``RANK`` /
``WORLD_SIZE`` (+ ``LOCAL_RANK``), else SLURM's ``SLURM_PROCID`` / ``SLURM_NTASKS`` (+ ``SLURM_LOCALID``),
else one process. The trainer turns it into a process group; data_tools into its share of the shards."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    """Rank, local rank (on this node) and world size, and which launcher set them."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    launcher: str = ""
    """``torchrun``, ``slurm``, or empty for a single process."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def ranks_from_env(env: Mapping[str, str] | None = None) -> Ranks:
    """The ranks torchrun set, else SLURM's (when it runs more than one task), else a single process;
    a variable that is not an integer is a ValueError naming it."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(_int(env, "RANK", 0), _int(env, "LOCAL_RANK", 0), _int(env, "WORLD_SIZE", 1), "torchrun")
    if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        rank, local = _int(env, "SLURM_PROCID", 0), _int(env, "SLURM_LOCALID", 0)
        return Ranks(rank, local, _int(env, "SLURM_NTASKS", 1), "slurm")
    return Ranks()
