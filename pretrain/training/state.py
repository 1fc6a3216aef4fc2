"""The run's resumable state: a checkpoint manager over named parts, and which checkpoint a run resumes.

Parts are saved and restored in the order registered. `files` parts write files of their own, every rank
taking part (the strategy's model and optimizer, the weight ensemble); `shared` parts are Stateful with their
entry in `trainer.pt` (rank 0 writes it, beside `TrainState`, the config and the world size); `gathered` parts
too, as the list of every rank's state, so that a run on another number of ranks can restore them (the data
position, the objective's); `rank` parts in `rank_{r:05d}.pt` (the random state: a rank the checkpoint did not
have keeps the one it was seeded with, `train.seed + rank`).
A checkpoint goes into `step_N.tmp/`; when every rank is done, rank 0 writes its manifest `_COMPLETE` (each
file's size and CRC-32) last, renames it, and only then does `latest` move: a crash at any point leaves the
previous checkpoint intact and current. Then `checkpoint.remote` gets a copy, with that manifest.

Resuming, rank 0 checks the checkpoint against its manifest before anything is read and tells the other
ranks which folder to load: the run directory is on a filesystem every rank sees (saving needs that), so one
reading of the files covers them all, where hashing a multi-GB checkpoint on every rank would be waste.
`resume=latest` whose newest checkpoint is damaged warns, naming the file and the reason, and takes the one
before (the damaged ones then set aside as `step_N.damaged/`); with none intact, or an explicit path that
fails, it is one `RunDirError` line, nothing renamed or written.
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
import torch.distributed as dist

from pretrain.config import Config, redacted, save_config
from pretrain.data.card import record_data_card
from pretrain.data.plan import source_weights
from pretrain.models import checkpoint as ckpt
from pretrain.parallel.base import Strategy
from pretrain.parallel.distributed import DistInfo, barrier, gather_objects, world
from pretrain.parallel.safe_load import safe_load
from pretrain.training import remote, restart
from webshards.atomic import write_atomic
from webshards.publish import seal

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


OPTIMIZER_KEPT = ("weight_decay", "beta1", "beta2", "eps", "optimizer_kwargs")
"""`train.*` keys whose checkpoint values a resumed run keeps: loading the optimizer's state restores its
parameter groups' settings as saved. A changed value is warned about, not used."""
OPTIMIZER_SHAPE = {
    "optimizer": "adamw", "image_lr": None, "text_lr": None, "image_layer_decay": 1.0, "text_layer_decay": 1.0,
    "wd_exclude": [],
}  # fmt: skip
"""`train.*` keys (and their defaults, for checkpoints written before them) that decide the optimizer's
class and how its parameter groups split: a resumed run must keep which of them are set, or the saved
optimizer state cannot be loaded (its rates may change: each group's base rate is this run's)."""


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
        """Create the run directory, write the resolved config and the data card, and pick the checkpoint to resume."""
        run_dir = self.cfg.run_dir
        # Workers torchrun restarted after a failure continue the newest checkpoint (restart.py)
        self.cfg = restart.resume_after_restart(self.cfg, self.info.is_main, self.device)
        # With checkpoint.remote: may download a newer checkpoint, or refuse remote ones a new run would overwrite
        problem = remote.prepare_run_dir(self.cfg, self.info.is_main, self.device)
        if problem is not None:
            raise RunDirError(problem)
        existing = ckpt.complete_checkpoints(self.root)
        if self.cfg.resume is None and existing:
            raise RunDirError(
                f"{run_dir} already has checkpoints; pass resume=latest to continue it or choose another run.name"
            )
        folder = None
        if self.cfg.resume == "latest" and not existing:
            log.info("resume=latest: no checkpoint in %s yet, starting from step 0", run_dir)
        elif self.cfg.resume is not None:  # before anything is written: a refusal leaves no run directory
            folder = self._agreed_checkpoint()
        if self.info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, run_dir / "config.yaml")
            data = self.cfg.data
            weights = (
                None
                if data.train == "synthetic"
                else source_weights(data.train, data.train_weights, data.train_upsampling_factors)
            )
            record_data_card(data.train, weights, run_dir, folder is not None)
            restart.record_launch(self.cfg)
        return folder

    def _agreed_checkpoint(self) -> Path:
        """The checkpoint `resume` selects, verified by rank 0 and the same on every rank; a problem is one
        `RunDirError` line on every rank."""
        outcome: list = [None]
        if self.info.is_main:
            try:
                outcome[0] = self._verified_checkpoint()
            except (ckpt.CheckpointError, FileNotFoundError, RunDirError) as e:
                outcome[0] = RunDirError(str(e))
            except Exception as e:
                # any other (an unreadable folder, say): every rank must learn of it, or the others wait forever
                outcome[0] = RunDirError(f"resume={self.cfg.resume}: {type(e).__name__}: {e}")
        if world()[1] > 1:
            dist.broadcast_object_list(outcome, src=0, device=self.device)
        if isinstance(outcome[0], RunDirError):
            raise outcome[0]
        return outcome[0]

    def _verified_checkpoint(self) -> Path:
        """`resume=PATH`'s checkpoint if it matches its manifest; for `resume=latest` the newest that does,
        from `latest` back, with a warning naming each damaged file and why."""
        if self.cfg.resume != "latest":
            folder = ckpt.resolve_checkpoint(self.cfg.resume)
            ckpt.verify_checkpoint(folder)
            return folder
        newest = ckpt.resolve_checkpoint(self.cfg.run_dir)
        damaged: list[tuple[Path, ckpt.CheckpointError]] = []
        for folder in reversed([p for p in ckpt.complete_checkpoints(self.root) if p.name <= newest.name]):
            try:
                ckpt.verify_checkpoint(folder)
            except ckpt.CheckpointError as e:
                log.warning("resume=latest: %s; trying the checkpoint before it", e)
                damaged.append((folder, e))
                continue
            self._set_aside([bad for bad, _ in damaged], folder)
            return folder
        # nothing set aside: a rerun must not find the folder empty and start from step 0
        raise RunDirError(f"resume=latest: no intact checkpoint in {self.root}: {damaged[0][1]}")

    def _set_aside(self, damaged: list[Path], resumed: Path) -> None:
        """Rename damaged checkpoints to `step_N.damaged/` (kept for a look; pruning, `latest` and the remote
        comparison pass them by) and point `latest` at the one resumed, for a crash before the next save."""
        for folder in damaged:
            aside = folder.with_name(f"{folder.name}.damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            log.warning("resume=latest: %s set aside as %s", folder.name, aside.name)
        if damaged:
            write_atomic(self.root / "latest", resumed.name.encode())

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
            seal(tmp, step=self.state.step)  # the manifest, last: a folder without it is not verified
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
        self._check_same_groups(folder, shared)
        self._warn_kept(folder, shared)
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

    def _check_same_groups(self, folder: Path, trainer_state: dict) -> None:
        """Refuse, in one line naming the key, a run whose optimizer or group split differs from the
        checkpoint's (torch would fail on the group count, or load one optimizer's state into another)."""
        saved = trainer_state.get("config", {}).get("train", {})

        def shape(key: str, value: Any) -> Any:
            return value if key == "optimizer" else value != OPTIMIZER_SHAPE[key]  # set or not

        for key, default in OPTIMIZER_SHAPE.items():
            was, now = saved.get(key, default), getattr(self.cfg.train, key)
            if shape(key, was) != shape(key, now):
                raise RunDirError(
                    f"{folder} was saved with train.{key}={was}, this run has {now}: the optimizer state "
                    "does not fit another optimizer or parameter-group split; resume with the saved value"
                )

    def _warn_kept(self, folder: Path, trainer_state: dict) -> None:
        """Say which changed `train.*` values the restored optimizer overrides (`OPTIMIZER_KEPT`)."""
        saved = trainer_state.get("config", {}).get("train", {})
        for key in OPTIMIZER_KEPT:
            now = getattr(self.cfg.train, key)
            if key in saved and saved[key] != now:
                log.warning(
                    "train.%s=%s is not used: the optimizer state of %s keeps its %s",
                    key,
                    now,
                    folder.name,
                    saved[key],
                )

    def flush(self) -> None:
        """Wait until the remote copier has copied every checkpoint (raises `RemoteError` if the last failed)."""
        if self.remote is not None:
            self.remote.flush()

    def close(self) -> None:
        if self.remote is not None:  # completed checkpoints still go after a crash
            self.remote.close()
