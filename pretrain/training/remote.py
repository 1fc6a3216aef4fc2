"""Copies of completed checkpoints on any fsspec storage (`checkpoint.remote`), made in the background.

Remote layout, under `{checkpoint.remote}/{run.name}/` (it mirrors the run directory):

    checkpoints/step_{N:08d}/...          the files of the local checkpoint folder, same relative paths
    checkpoints/step_{N:08d}/_COMPLETE    written last: {"step": N, "files": {path: {"size", "crc32"}}}
    checkpoints/latest                    name of the newest complete folder, written after its marker
    metrics.jsonl                         the run's metrics as of the newest copy

A folder counts only with its marker, so a reader never takes a half-copied checkpoint; pruning (the same
`checkpoint.keep` as locally) deletes the marker first. The marker is the manifest the local folder was
sealed with when it was saved (`webshards.publish`), so nothing is hashed again to upload it. `resume=latest`
downloads the newest complete folder when it is newer than every local one (a fresh node, an emptied run
directory), checks every file against the marker's sizes and checksums, and resumes from it; a copy that
does not match is logged with the file and the reason, and the next older remote folder is tried.

Who copies: rank 0, the whole folder. Saving already needs the run directory on a filesystem all ranks see
(rank 0 renames the folder every rank wrote into), so rank 0 sees every rank's files (FSDP's per-rank DCP
shards, DeepSpeed's partitions) whatever the strategy; on resume rank 0 downloads and the other ranks read
the local copy as after any save. One copier is simpler than per-rank uploads, and enough while one node's
bandwidth keeps up with the checkpoint cadence.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.models.checkpoint import STEP_DIR, complete_checkpoints
from pretrain.parallel.distributed import world
from webshards.atomic import write_atomic
from webshards.outputs import join
from webshards.publish import MARKER, check_files, listed_sizes, publish
from webshards.urls import redact_url, url_to_fs

log = logging.getLogger("pretrain")

ATTEMPTS = 4
"""Tries per copy (the first and three retries)."""
BACKOFF_S = 5.0
"""Wait before the first retry; doubled after each."""


class RemoteError(ValueError):
    """A copy to or from `checkpoint.remote` failed; the message holds no credentials."""


class RemoteStore:
    """One run's folder at `checkpoint.remote`: upload, list, download and prune checkpoint folders."""

    def __init__(self, url: str, run_name: str) -> None:
        self.url = str(join(url, run_name))
        self.shown = redact_url(self.url)
        """The URL as it may be logged."""
        self.fs, self.root = url_to_fs(self.url)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def step_folders(self) -> list[str]:
        """Names of the step folders there (complete or not), oldest first."""
        self.fs.invalidate_cache()  # another node (or this one) may have written since the last listing
        if not self.fs.exists(self._path("checkpoints")):
            return []
        names = (PurePosixPath(p).name for p in self.fs.ls(self._path("checkpoints"), detail=False))
        return sorted(n for n in names if STEP_DIR.match(n))

    def is_complete(self, name: str) -> bool:
        return self.fs.exists(self._path("checkpoints", name, MARKER))

    def newest_complete(self) -> str | None:
        return next(iter(self.complete_newest_first()), None)

    def complete_newest_first(self) -> list[str]:
        return [n for n in reversed(self.step_folders()) if self.is_complete(n)]

    def upload(self, folder: Path, name: str) -> None:
        """Publish `folder` as `checkpoints/{name}/` (its own marker, or one made now, last), then `latest`."""
        publish(folder, str(join(self.url, f"checkpoints/{name}")), step=int(name[5:]))
        self.fs.pipe_file(self._path("checkpoints", "latest"), name.encode())

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` complete folders; older ones (and older partial copies) go, marker first."""
        names = self.step_folders()
        kept = [n for n in names if self.is_complete(n)][-keep:]
        for name in (n for n in names if kept and n < kept[0]):
            if self.is_complete(name):
                self.fs.rm(self._path("checkpoints", name, MARKER))
            self.fs.rm(self._path("checkpoints", name), recursive=True)

    def download(self, name: str, ckpt_root: Path) -> Path:
        """The files listed in the folder's marker into `ckpt_root/name`, renamed into place with the marker
        when all are there and match its sizes and checksums (a `RemoteError` naming the file otherwise),
        then the local `latest`."""
        where = f"{self.shown}/checkpoints/{name}/{MARKER}"
        marker = self.fs.cat_file(self._path("checkpoints", name, MARKER))
        files = listed_sizes(marker, where)  # none outside the folder
        final, tmp = ckpt_root / name, ckpt_root / f"{name}.download"
        shutil.rmtree(tmp, ignore_errors=True)
        for relative in files:
            local = tmp.joinpath(*PurePosixPath(relative).parts)
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path("checkpoints", name, relative), str(local))
        problem = check_files(tmp, marker, where)
        if problem is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RemoteError(f"{self.shown}/checkpoints/{name}/{problem[0]}: {problem[1]}")
        (tmp / MARKER).write_bytes(marker)  # the local copy verifies on resume as a saved one does
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(ckpt_root / "latest", name.encode())
        return final

    def put_metrics(self, data: bytes) -> None:
        self.fs.pipe_file(self._path("metrics.jsonl"), data)

    def get_metrics(self, path: Path) -> None:
        """The remote metrics.jsonl into `path` (it covers at least the downloaded checkpoint's steps)."""
        if self.fs.exists(self._path("metrics.jsonl")):
            write_atomic(path, self.fs.cat_file(self._path("metrics.jsonl")))


@dataclass
class _Copy:
    name: str
    snapshot: Path
    metrics: bytes | None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Uploader:
    """Rank 0's background copier: `submit` returns at once, one thread copies. A copy that fails is logged
    as an error and retried (`ATTEMPTS`, backoff from `BACKOFF_S`); `flush` waits for the queue and raises
    `RemoteError` when the newest checkpoint could not be copied. When checkpoints come faster than they
    upload, only the newest waiting one is copied (the skipped ones are logged)."""

    def __init__(self, store: RemoteStore, ckpt_root: Path, metrics_path: Path, keep: int) -> None:
        self.store, self.keep, self.metrics_path = store, keep, metrics_path
        self.staging = ckpt_root / ".remote-staging"
        self.failed: str | None = None
        """Name of the newest copied-or-tried checkpoint when its copy failed."""
        self._cond = threading.Condition()
        self._pending: list[_Copy] = []
        self._busy = self._closed = False
        self._thread = threading.Thread(target=self._work, name="checkpoint-remote", daemon=True)
        self._thread.start()

    def submit(self, folder: Path) -> None:
        """Queue a completed checkpoint folder. Its files are hard-linked first (copied where links fail):
        local keep-last-k pruning may delete the folder while it is still uploading."""
        snapshot = self.staging / folder.name
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(folder, snapshot, copy_function=_link_or_copy)
        metrics = self.metrics_path.read_bytes() if self.metrics_path.is_file() else None
        with self._cond:
            self._pending.append(_Copy(folder.name, snapshot, metrics))
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                *skipped, job = self._pending
                self._pending, self._busy = [], True
            for old in skipped:
                log.warning(
                    "checkpoint %s not copied to %s: %s is newer and waiting",
                    old.name,
                    self.store.shown,
                    job.name,
                )
                shutil.rmtree(old.snapshot, ignore_errors=True)
            ok = self._copy(job)
            with self._cond:
                self.failed, self._busy = (None if ok else job.name), False
                self._cond.notify_all()

    def _copy(self, job: _Copy) -> bool:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self.store.upload(job.snapshot, job.name)
                self.store.prune(self.keep)
                if job.metrics is not None:
                    self.store.put_metrics(job.metrics)
                log.info("copied checkpoint %s to %s", job.name, self.store.shown)
                shutil.rmtree(job.snapshot, ignore_errors=True)
                return True
            except Exception as e:  # any failure of any fsspec backend: report it, retry, never lose it
                wait = BACKOFF_S * 2 ** (attempt - 1)
                again = f"; retrying in {wait:.0f}s" if attempt < ATTEMPTS else "; giving up"
                log.error(
                    "copying checkpoint %s to %s failed (attempt %d/%d): %s%s",
                    job.name, self.store.shown, attempt, ATTEMPTS, redact_url(f"{type(e).__name__}: {e}"), again,
                )  # fmt: skip
                if attempt < ATTEMPTS:
                    time.sleep(wait)
        shutil.rmtree(job.snapshot, ignore_errors=True)
        return False

    def flush(self) -> None:
        """Wait until every submitted checkpoint is copied or given up; raise if the newest was given up."""
        with self._cond:
            while self._pending or self._busy:
                self._cond.wait()
            failed = self.failed
        if failed is not None:
            raise RemoteError(
                f"checkpoint {failed} could not be copied to {self.store.shown} (errors above); it is complete "
                f"locally in {self.staging.parent}"
            )

    def close(self) -> None:
        """Finish the waiting copies (after a crash too: completed checkpoints still go), stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        shutil.rmtree(self.staging, ignore_errors=True)


def build_uploader(cfg: Config, is_main: bool) -> Uploader | None:
    """Rank 0's copier when `checkpoint.remote` is set (None elsewhere)."""
    if cfg.checkpoint.remote is None or not is_main:
        return None
    store = RemoteStore(cfg.checkpoint.remote, cfg.run.name)
    return Uploader(store, cfg.run_dir / "checkpoints", cfg.run_dir / "metrics.jsonl", cfg.checkpoint.keep)


def _prepare_on_rank0(cfg: Config) -> str | None:
    store = RemoteStore(cfg.checkpoint.remote, cfg.run.name)
    names = store.complete_newest_first()
    if not names:
        return None
    if cfg.resume is None:
        return (
            f"checkpoint.remote {store.shown} already has checkpoints ({names[0]}); pass resume=latest to "
            "continue that run or choose another run.name"
        )
    ckpt_root = cfg.run_dir / "checkpoints"
    local = complete_checkpoints(ckpt_root)
    newer = [name for name in names if not local or name > local[-1].name]  # zero-padded steps sort as names
    for name in newer:
        log.info("resume=latest: downloading %s from %s", name, store.shown)
        try:
            store.download(name, ckpt_root)
        except RemoteError as e:
            log.warning("resume=latest: %s; trying the checkpoint before it", e)
            continue
        store.get_metrics(cfg.run_dir / "metrics.jsonl")
        return None
    if newer and not local:  # not a silent start from step 0
        return f"resume=latest: no intact checkpoint at checkpoint.remote {store.shown} (warnings above)"
    return None


def prepare_run_dir(cfg: Config, is_main: bool, device: torch.device) -> str | None:
    """Before the run directory is read: with `resume=latest`, download the newest complete remote checkpoint
    when it is newer than the local ones; without `resume`, refuse remote checkpoints this run would
    overwrite. Rank 0 does it; every rank gets the outcome, a one-line problem or None."""
    if cfg.checkpoint.remote is None or cfg.resume not in (None, "latest"):
        return None
    outcome = [None]
    if is_main:
        try:
            outcome[0] = _prepare_on_rank0(cfg)
        except Exception as e:  # every rank must learn of it, or the others would wait forever
            outcome[0] = redact_url(f"checkpoint.remote {cfg.checkpoint.remote}: {type(e).__name__}: {e}")
    if world()[1] > 1:
        dist.broadcast_object_list(outcome, src=0, device=device)
    return outcome[0]
