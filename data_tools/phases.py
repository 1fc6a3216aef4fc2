"""Multi-phase jobs on the one task runner: map, partition, reduce, merge, each phase a list of tasks.

``filter --keep-fraction`` and every ``dedup`` method are global computations. They run as a chain of
phases whose tasks are independent and idempotent (each writes its marker file last), so every phase runs
on whatever engine ``runner.run_tasks`` offers: the local process pool, a rank/world split across nodes,
or a cluster engine. A later phase reads the earlier phase's files, so before it starts, a node waits until
*every* marker of the earlier phase exists — written by itself or by other ranks on the shared folder —
polling with a timeout (``RunnerOptions.phase_timeout``) and failing with one line naming the phase and a
missing file. Without a rank split the wait finds all markers at once. The scratch folder may be on an fsspec store
(``s3://…``, when the job's output is): markers are then polled there, since the nodes share no disk.

The last phase is different: only rank 0 waits for it, then merges (small); the other ranks end once
their own tasks are done. Every rank then marks itself done, and rank 0 removes the scratch folder only
when all ranks have, so no rank can be left polling for files that are gone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from data_tools.runner import RunnerOptions, Task, run_tasks
from webshards import outputs
from webshards.outputs import Location

POLL_SECONDS = 2.0


class JobFailed(RuntimeError):
    """The work itself failed (a task failed, other ranks' work never arrived): exit status 1, where a
    ValueError (what the command was given is wrong) is 2."""


def run_phase(
    tasks: list[Task], fn: Callable[[Task], int], options: RunnerOptions, desc: str, *, last: bool = False
) -> None:
    """Run this node's share of one phase, then wait until all its markers exist (rank 0 only if ``last``).

    A failed task raises a JobFailed naming it (a rerun retries only the failed tasks).
    """
    start = time.perf_counter()
    summary = run_tasks(tasks, fn, options, desc=desc, task_unit="tasks")
    if not summary.ok():
        name, reason = summary.failed[0]
        raise JobFailed(
            f"{desc}: {len(summary.failed)} task(s) failed, e.g. {name}: {reason}; rerun to retry"
        )
    if not last or options.is_merger:
        wait_for_markers([task.output for task in tasks], options.phase_timeout, desc)
    options.timings[desc] = options.timings.get(desc, 0.0) + time.perf_counter() - start


def wait_for_markers(markers: list[Location], timeout: float, desc: str) -> None:
    """Poll until every marker (a path or URL) exists; a JobFailed names the phase and a missing file after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    missing = list(markers)
    while True:
        missing = [m for m in missing if not outputs.exists(m)]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise JobFailed(
                f"{desc}: {len(missing)} task(s) of other ranks not complete after {timeout:g} s, "
                f"e.g. {missing[0]} is missing (is every rank running, with the same settings?)"
            )
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))


def settings_key(settings: dict[str, Any]) -> str:
    """A short digest of ``settings``: scratch folders are named by it, so files of other settings are
    never mistaken for this job's."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def input_fingerprint(files: list[Location]) -> list[tuple[str, int, int | str]]:
    """Name, size and version (mtime, ETag) of each input file, so a rerun on changed inputs uses fresh
    scratch files."""
    return [outputs.fingerprint(f) for f in files]


def release_scratch(scratch: Location, work: Location, options: RunnerOptions) -> None:
    """The end of a job on every rank: mark this rank done (past every barrier); rank 0, after its merge,
    waits for all ranks' marks and then deletes the scratch folder, so no rank still polls files in it."""
    rank, world = options.ranks()
    marks = [outputs.join(work, f"ranks/{r}-of-{world}.done") for r in range(world)]
    outputs.write_bytes(marks[rank], b"")
    if rank == 0:
        wait_for_markers(marks, options.phase_timeout, "end of job")
        outputs.remove_tree(scratch)
