"""The one task runner for every data_tools job: a process pool locally, a rank/world split across nodes,
or a Ray cluster (``engine="ray"``, see ``engine_ray``).

A job is a list of tasks, each with the one file whose existence marks it complete (written last, by the
task). Running a job again skips complete tasks, so a killed job resumes where it stopped; nodes given
the same task list and their own rank each take a disjoint share, so together they cover it once. The
same property lets Ray rerun a task whose node died, on another node.
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

from data_tools.engine_ray import ActorSpec, Outcome, run_on_ray
from webshards import outputs
from webshards.progress import Progress
from webshards.ranks import ranks_from_env

log = logging.getLogger("data_tools")

ENGINES = ("local", "ray")


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

    def ok(self) -> bool:
        """Whether every task of this node is complete."""
        return not self.failed

    def line(self, desc: str = "") -> str:
        """One line, e.g. ``build: 3 done, 1 skipped, 1 failed; 300 samples in 2.0 s (150.0/s); failed 00004: ...``."""
        prefix = f"{desc}: " if desc else ""
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        failures = "".join(f"; failed {name}: {reason}" for name, reason in self.failed)
        return (
            f"{prefix}{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed; "
            f"{self.samples} {self.unit} in {self.seconds:.1f} s ({rate:.1f}/s){failures}"
        )


def node_split(tasks: list[Task], rank: int, world: int) -> list[Task]:
    """This node's share: task ``i`` goes to rank ``i % world``, order kept."""
    _check_rank_world(rank, world)
    return [task for i, task in enumerate(tasks) if owns(i, rank, world)]


def owns(index: int, rank: int, world: int) -> bool:
    """Whether task number ``index`` of a job belongs to ``rank`` (lets a job prepare only its share)."""
    return index % world == rank


def resolve_rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """Rank and world size: explicit arguments, else torchrun's or SLURM's environment, else (0, 1)."""
    if rank is None or world is None:
        env = ranks_from_env()
        rank = env.rank if rank is None else rank
        world = env.world if world is None else world
    _check_rank_world(rank, world)
    return rank, world


def _check_rank_world(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank {rank}, world {world}")


def run_tasks(
    tasks: list[Task],
    fn: Callable[[Task], int],
    *,
    workers: int = 1,
    rank: int | None = None,
    world: int | None = None,
    desc: str = "",
    unit: str = "samples",
    task_unit: str = "shards",
    engine: str = "local",
    ray_address: str | None = None,
    actors: ActorSpec | None = None,
) -> RunSummary:
    """Run this node's incomplete tasks with ``fn`` (returns samples processed); one failure stops no other.

    ``engine="local"``: ``workers`` processes here; ``fn`` must be picklable (a module-level function)
    when ``workers > 1``, with one worker it runs in this process, which makes debugging easy.
    ``engine="ray"``: one Ray task per task on the cluster at ``ray_address`` (``workers`` is unused), or
    calls on long-lived ``actors`` (e.g. holding a model).
    Progress (``webshards.progress``): tasks done of this node's pending ones, counted in ``task_unit``, and
    the ``unit`` (samples) they processed; a bar on a terminal, else a line every ``progress.every`` s.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    _check_unique([task.name for task in tasks])
    rank, world = resolve_rank_world(rank, world)
    start = time.perf_counter()
    summary = RunSummary(unit=unit)
    pending = []
    for task in node_split(tasks, rank, world):
        if outputs.exists(task.output):
            summary.skipped.append(task.name)
        else:
            pending.append(task)
    guarded = partial(_call_guarded, fn)
    # Ray: many nodes report to one driver log, so lines only, no bar
    bar = False if engine == "ray" else None
    node = f"{desc} rank {rank}/{world}" if world > 1 else desc
    try:
        with Progress(node, len(pending), task_unit, unit, logger=log, bar=bar) as progress:
            record = partial(_record, summary, progress)
            if engine == "ray":
                run_on_ray(pending, guarded, record, progress.tick, ray_address, actors)
            else:
                _run_pending(pending, guarded, workers, record, progress)
    except KeyboardInterrupt:
        finished = len(summary.done) + len(summary.failed)
        raise Interrupted(
            f"{finished} of {len(pending)} tasks finished; the same command again skips the complete ones"
        ) from None
    summary.seconds = time.perf_counter() - start
    (log.error if summary.failed else log.info)("%s", summary.line(node))
    return summary


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job, saying how far it got: its complete tasks are kept, so a rerun resumes."""


def _check_unique(names: list[str]) -> None:
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"task names must be unique, {duplicate!r} repeats")


def _run_pending(
    pending: list[Task],
    guarded: Callable[[Task], Outcome],
    workers: int,
    record: Callable[[Outcome], None],
    progress: Progress,
) -> None:
    """Run tasks in a pool (or in-process for one worker), recording each outcome as it arrives; progress
    lines keep coming while a long task runs."""
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
    try:
        return task.name, int(fn(task) or 0), None
    except Exception as error:  # noqa: BLE001 - any task error is recorded, the job goes on
        return task.name, 0, f"{type(error).__name__}: {error}"


def _record(summary: RunSummary, progress: Progress, outcome: Outcome) -> None:
    """Add one task's outcome (name, samples, failure reason or None) to the summary and the progress."""
    name, samples, error = outcome
    if error is None:
        summary.done.append(name)
        summary.samples += samples
    else:
        summary.failed.append((name, error))
        log.warning("task %s failed: %s", name, error)
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
