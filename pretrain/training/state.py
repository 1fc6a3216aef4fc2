"""The run's resumable state: a checkpoint manager over named parts, and which checkpoint a run resumes.

Parts are saved and restored in the order registered. `files` parts write files of their own, every rank
taking part (the strategy's model and optimizer, the weight ensemble); `shared` parts are Stateful with their
entry in `trainer.pt` (rank 0 writes it, beside `TrainState`, the config and the world size); `gathered` parts
too, as the list of every rank's state, so that a run on another number of ranks can restore them (the data
position, the objective's); `rank` parts in `rank_{r:05d}.pt` (the random state: a rank the checkpoint did not
have keeps the one it was seeded with, `train.seed + rank`).
A checkpoint goes into `step_N.tmp/`, renamed once every rank is done, and only then does `latest` move: a
crash at any point leaves the previous checkpoint intact and current. Then `checkpoint.remote` gets a copy.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pretrain.config import Config, redacted, save_config
from pretrain.models import checkpoint as ckpt
from pretrain.parallel.base import Strategy
from pretrain.parallel.distributed import DistInfo, barrier, gather_objects, world
from pretrain.parallel.safe_load import safe_load
from pretrain.training import remote
from webshards.atomic import write_atomic

log = logging.getLogger("pretrain")

Scope = Literal["files", "shared", "gathered", "rank"]


def _numpy_state() -> dict:
    """numpy's global RNG state as plain values (a numpy array is not allowed by weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def _set_numpy_state(state: dict) -> None:
    keys = np.asarray(state["keys"], dtype=np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached"]))


class GlobalRng:
    """The global generators (Python's, numpy's, torch's, CUDA's) as one Stateful: a rank's augmentations."""

    @staticmethod
    def state_dict() -> dict:
        state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def load_state_dict(state: dict) -> None:
        random.setstate(state["python"])
        _set_numpy_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class RunDirError(RuntimeError):
    """The run directory holds work that this run would overwrite, or a checkpoint that does not fit it."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed."""
    samples_seen: int = 0
    """Global samples consumed (all ranks, all micro-steps)."""


@dataclass(frozen=True)
class StrategyFiles:
    """The model and optimizer, as the strategy writes and reads them (it picks the ranks that write)."""

    strategy: Strategy
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def save(self, folder: Path) -> None:
        self.strategy.save(folder, self.module, self.optimizer, is_main=world()[0] == 0)

    def load(self, folder: Path) -> None:
        self.strategy.load(folder, self.module, self.optimizer)


class CheckpointManager:
    """Saves and restores every registered part of a run; adding a stateful part is one `register` call."""

    def __init__(self, cfg: Config, info: DistInfo, device: torch.device, state: TrainState) -> None:
        self.cfg, self.info, self.device, self.state = cfg, info, device, state
        self.root = cfg.run_dir / "checkpoints"
        self.remote: remote.Uploader | None = None
        self._parts: dict[str, tuple[Any, Scope, Any]] = {}

    def register(self, name: str, part: Any, scope: Scope, default: Any = None) -> None:
        """Save `part` under `name` from now on; a checkpoint without it resumes with `default` (if any)."""
        self._parts[name] = (part, scope, default)

    def start(self) -> None:
        """Prepare the run directory, resume the checkpoint `resume` selects, and start the remote copier."""
        folder = self._prepare_run_dir()
        if folder is not None:
            self.load(folder)
        self.remote = remote.build_uploader(self.cfg, self.info.is_main)

    def _prepare_run_dir(self) -> Path | None:
        """Create the run directory, write the resolved config, and pick the checkpoint to resume."""
        run_dir = self.cfg.run_dir
        # With checkpoint.remote: may download a newer checkpoint, or refuse remote ones a new run would overwrite
        problem = remote.prepare_run_dir(self.cfg, self.info.is_main, self.device)
        if problem is not None:
            raise RunDirError(problem)
        existing = ckpt.complete_checkpoints(self.root)
        if self.cfg.resume is None and existing:
            raise RunDirError(
                f"{run_dir} already has checkpoints; pass resume=latest to continue it or choose another run.name"
            )
        if self.info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, run_dir / "config.yaml")
        if self.cfg.resume is None or (self.cfg.resume == "latest" and not existing):
            if self.cfg.resume == "latest":
                log.info("resume=latest: no checkpoint in %s yet, starting from step 0", run_dir)
            return None
        return ckpt.resolve_checkpoint(run_dir if self.cfg.resume == "latest" else self.cfg.resume)

    def _scope(self, scope: Scope) -> dict[str, Any]:
        return {name: part for name, (part, kind, _) in self._parts.items() if kind == scope}

    def save(self) -> Path:
        """Write `step_N/` from every rank, point `latest` at it, prune to `checkpoint.keep`, copy it remote."""
        rank_state = {name: part.state_dict() for name, part in self._scope("rank").items()}  # RNGs untouched
        gathered = {name: gather_objects(part.state_dict()) for name, part in self._scope("gathered").items()}
        final = self.root / ckpt.step_dir_name(self.state.step)
        tmp = self.root / (final.name + ".tmp")
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        for part in self._scope("files").values():
            part.save(tmp)
        if self.info.is_main:
            shared = {name: part.state_dict() for name, part in self._scope("shared").items()}
            torch.save(
                {
                    **vars(self.state),
                    **shared,
                    **gathered,
                    "world": self.info.world,
                    "config": redacted(self.cfg),
                },
                tmp / "trainer.pt",
            )
        torch.save(rank_state, ckpt.rank_file(tmp, self.info.rank))
        barrier()
        if self.info.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_atomic(self.root / "latest", final.name.encode())
            for old in ckpt.complete_checkpoints(self.root)[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        log.info("saved checkpoint %s", final)
        if self.remote is not None:
            self.remote.submit(final)  # copied in the background
        return final

    def load(self, folder: Path) -> None:
        """Restore every part from `folder`, after checking that this run's model wrote it. On another number
        of ranks, `gathered` parts get every saved rank's state and a new rank's `rank` parts keep theirs."""
        shared = ckpt.load_trainer_state(folder)
        self._check_same_model(folder, shared)
        saved_world = shared.get("world", len(ckpt.rank_files(folder)))
        if saved_world != self.info.world:
            log.info("resuming %s, saved by %d rank(s), on %d", folder, saved_world, self.info.world)
        own = ckpt.rank_file(folder, self.info.rank)
        saved = {"shared": shared, "rank": safe_load(own) if own.is_file() else None}
        for name, (part, scope, default) in self._parts.items():
            if scope == "files":
                self._load_files(folder, part)
                continue
            if scope == "rank" and saved["rank"] is None:
                log.info(
                    "rank %d: %s has no %s, its %r starts afresh", self.info.rank, folder, own.name, name
                )
                continue
            if scope == "gathered":  # a checkpoint of an earlier version kept them in the rank files
                value = shared.get(name) or [safe_load(f).get(name) for f in ckpt.rank_files(folder)]
                value = None if None in value else value
            else:
                value = saved[scope].get(name)
            value = default if value is None else value
            if value is None:
                raise ValueError(f"{folder} has no {name!r}: it was saved with other settings")
            part.load_state_dict(value)
        self.state.step, self.state.samples_seen = shared["step"], shared["samples_seen"]
        log.info("resumed from %s at step %d", folder, self.state.step)

    def _load_files(self, folder: Path, part: Any) -> None:
        try:
            part.load(folder)
        except RuntimeError as e:  # same name, other shapes (an edited model config): one line, not 80
            reason = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), None)
            if reason is None:
                raise
            raise RunDirError(
                f"{folder} does not fit this run's model {self.cfg.model.name!r}: {reason}"
            ) from None

    def _check_same_model(self, folder: Path, trainer_state: dict) -> None:
        """Refuse to resume a checkpoint another model wrote (a smoke test's tiny model in the run directory
        the real run resumes), naming both, before any weights are read."""
        saved = trainer_state.get("config", {}).get("model", {}).get("name")
        if saved is not None and Path(saved).stem != Path(self.cfg.model.name).stem:
            raise RunDirError(
                f"{folder} was written by model {saved!r}, not this run's model.name {self.cfg.model.name!r}: "
                "resume it with that model, or start this run under another run.name"
            )

    def flush(self) -> None:
        """Wait until the remote copier has copied every checkpoint (raises `RemoteError` if the last failed)."""
        if self.remote is not None:
            self.remote.flush()

    def close(self) -> None:
        if self.remote is not None:  # completed checkpoints still go after a crash
            self.remote.close()
