"""Resumable tasks run in a local process pool: the part of a task runner that needs no rank split and
no cluster (``data_tools.runner`` adds both; the procedural demo set uses this alone).

A task is complete when its output exists (the task writes it last), so a rerun skips complete tasks and a
killed job resumes where it stopped. One task's failure stops no other: it is recorded with its reason.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from webshards import outputs
from webshards.progress import Progress
from webshards.retries import retries_so_far

log = logging.getLogger("webshards")

Outcome = tuple[str, int, "str | None", int]
"""(task name, samples processed, failure reason or None, storage requests retried while it ran): what a
guarded task call returns."""
Execute = Callable[[list[Any], Callable[[Any], Outcome], Callable[[Outcome], None], Progress], None]
"""How pending tasks run: ``execute(pending, guarded, record, progress)`` calls ``guarded`` on every task,
hands each outcome to ``record`` as it arrives and keeps ``progress`` ticking (``run_in_pool``, or Ray)."""


@dataclass
class Task:
    """One unit of work: ``output`` existing means it is complete (the task writes it last)."""

    name: str
    output: Path | str
    """A local path or an fsspec URL (``s3://…``)."""
    payload: Any = None


@dataclass
class RunSummary:
    """What a run did: task names done, skipped (already complete) and failed with the reason."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    unit: str = "samples"
    storage_retries: int = 0
    """Storage requests retried by the tasks (whatever process ran them) and by the completeness checks."""

    def ok(self) -> bool:
        """Whether every task of this node is complete."""
        return not self.failed

    def line(self, desc: str = "") -> str:
        """One line, e.g. ``build: 3 done, 1 skipped, 1 failed; 300 samples in 2.0 s (150.0/s); 7 storage
        retries; failed 00004: ...`` (the retries only when there were some)."""
        prefix = f"{desc}: " if desc else ""
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        retries = f"; {self.storage_retries} storage retries" if self.storage_retries else ""
        failures = "".join(f"; failed {name}: {reason}" for name, reason in self.failed)
        return (
            f"{prefix}{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed; "
            f"{self.samples} {self.unit} in {self.seconds:.1f} s ({rate:.1f}/s){retries}{failures}"
        )


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job, saying how far it got: its complete tasks are kept, so a rerun resumes."""


def run_incomplete(
    tasks: list[Task],
    fn: Callable[[Task], int],
    execute: Execute,
    *,
    desc: str = "",
    unit: str = "samples",
    task_unit: str = "shards",
    logger: logging.Logger = log,
    bar: bool | None = None,
) -> RunSummary:
    """Run the tasks whose output does not exist yet with ``fn`` (returns samples processed), the way
    ``execute`` runs them; the others are skipped. Progress (``webshards.progress``): tasks done of the
    pending ones, counted in ``task_unit``, and the ``unit`` (samples) they processed, on ``logger``."""
    check_unique([task.name for task in tasks])
    start = time.perf_counter()
    summary = RunSummary(unit=unit)
    pending, retried_before = [], retries_so_far()
    for task in tasks:
        if outputs.exists(task.output):
            summary.skipped.append(task.name)
        else:
            pending.append(task)
    summary.storage_retries = retries_so_far() - retried_before  # the tasks' own come with their outcomes
    try:
        with Progress(desc, len(pending), task_unit, unit, logger=logger, bar=bar) as progress:
            record = partial(_record, summary, progress, logger)
            execute(pending, partial(_call_guarded, fn), record, progress)
    except KeyboardInterrupt:
        finished = len(summary.done) + len(summary.failed)
        raise Interrupted(
            f"{finished} of {len(pending)} tasks finished; the same command again skips the complete ones"
        ) from None
    summary.seconds = time.perf_counter() - start
    (logger.error if summary.failed else logger.info)("%s", summary.line(desc))
    return summary


def check_unique(names: list[str]) -> None:
    """Refuse a job whose task names repeat (outcomes are told apart by name)."""
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"task names must be unique, {duplicate!r} repeats")


def in_pool(workers: int) -> Execute:
    """Run the tasks in ``workers`` local processes; with one, in this process (easy to debug). ``fn`` must
    be picklable (a module-level function) when ``workers > 1``."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return partial(_run_in_pool, workers=workers)


def _run_in_pool(
    pending: list[Task],
    guarded: Callable[[Task], Outcome],
    record: Callable[[Outcome], None],
    progress: Progress,
    workers: int,
) -> None:
    """Record each outcome as it arrives; progress lines keep coming while a long task runs."""
    if workers == 1 or len(pending) <= 1:
        with progress.ticking():  # this process is busy in the task: a thread ticks
            for task in pending:
                record(guarded(task))
        return
    # the workers leave Ctrl-C to this process (one line, not a traceback per worker); leaving the `with`
    # terminates them
    with Pool(min(workers, len(pending)), initializer=_ignore_ctrl_c) as pool:
        outcomes = pool.imap_unordered(guarded, pending)
        for _ in pending:
            record(_next_outcome(outcomes, progress))


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _next_outcome(outcomes: Any, progress: Progress) -> Outcome:
    """The pool's next outcome, ticking the progress while none arrives."""
    while True:
        try:
            return outcomes.next(timeout=progress.tick_every)
        except multiprocessing.TimeoutError:  # nothing finished in a while: a line may be due
            progress.tick()


def _call_guarded(fn: Callable[[Task], int], task: Task) -> Outcome:
    """Run one task; an exception becomes its failure reason instead of ending the job."""
    retried_before = retries_so_far()
    try:
        samples, error = int(fn(task) or 0), None
    except Exception as exc:  # noqa: BLE001 - any task error is recorded, the job goes on
        samples, error = 0, f"{type(exc).__name__}: {exc}"
    return task.name, samples, error, retries_so_far() - retried_before


def _record(summary: RunSummary, progress: Progress, logger: logging.Logger, outcome: Outcome) -> None:
    """Add one task's outcome (name, samples, failure reason or None, retries) to the summary and the
    progress."""
    name, samples, error, retries = outcome
    summary.storage_retries += retries
    if error is None:
        summary.done.append(name)
        summary.samples += samples
    else:
        summary.failed.append((name, error))
        logger.warning("task %s failed: %s", name, error)
    progress.update(1, samples)


def check_settings(path: Path | str, settings: dict[str, Any], what: str) -> bool:
    """Refuse to resume into a folder whose settings file ``path`` (local or a URL) records other
    ``settings``: a ValueError names ``what`` the folder holds and each changed key. Returns whether the
    file was there."""
    if not outputs.exists(path):
        return False
    previous = json.loads(outputs.read_bytes(path))
    changed = [f"{k} {previous.get(k)!r} -> {v!r}" for k, v in settings.items() if previous.get(k) != v]
    if changed:
        folder = str(path).rsplit("/", 1)[0]
        raise ValueError(f"{folder} holds {what} with other settings ({', '.join(changed)})")
    return True
