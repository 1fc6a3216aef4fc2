"""The Ray engine of the task runner: each pending task a Ray task (or a call on a long-lived actor).

Tasks are idempotent and write their completion marker last, so a task lost with its node is simply run
again elsewhere: Ray retries it (``TASK_RETRIES``) instead of a person rerunning the job. The task
function and its ``Task`` travel by cloudpickle; module-level functions travel by reference, so the
project must be importable on every node (the same image or ``pip install`` everywhere). Outputs must be
on storage every node sees (a shared file system or an ``s3://`` URL).

Ray is optional (``pip install clip-pretrain[ray]``): it is imported only when a job asks for it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from webshards.progress import Progress
from webshards.tasks import Outcome

log = logging.getLogger("data_tools")

TASK_RETRIES = 3
"""Times Ray reruns a task whose worker or node died (task errors are recorded, not retried)."""
ACTOR_RESTARTS = 3
"""Times Ray restarts an actor whose process or node died; its unfinished calls are retried as often."""
IN_FLIGHT = 2000
"""Ray tasks submitted and not yet finished, at most (the rest wait in the driver)."""
WAKE_EVERY = 5.0
"""Seconds the driver waits for a finished task before it checks whether a progress line is due."""
CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the head's GCS port to answer before giving up on ``--ray-address``."""
INSTALL_HINT = "--engine ray needs `pip install clip-pretrain[ray]`"
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "WEBSHARDS_S3_CONNECT_TIMEOUT",
    "WEBSHARDS_S3_READ_TIMEOUT",
)  # fmt: skip
"""Driver settings the tasks need to reach the same storage the same way (endpoint, retries, timeouts: see
``webshards.s3``); credentials stay with the nodes (their environment, instance roles), never sent through
the cluster."""


@dataclass(frozen=True)
class ActorSpec:
    """Run a job's tasks as calls on long-lived Ray actors instead of one Ray task each.

    For tasks that share costly state, e.g. embed's model: ``setup`` runs once when an actor starts (it
    loads and caches the state in that process) and every task the actor then runs reuses it.
    """

    setup: Callable[[], Any] | None = None
    """Called once in each actor process before its first task."""
    num_cpus: float = 1.0
    """CPUs each actor holds."""
    num_gpus: float = 0.0
    """GPUs each actor holds (1: one actor per GPU)."""
    count: int | None = None
    """Actors to start; None: as many as the cluster's CPUs (GPUs when ``num_gpus``) hold."""


def import_ray() -> Any:
    """The ``ray`` module, with usage stats off unless the user chose (no traffic beyond the cluster)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as error:
        raise ValueError(f"{INSTALL_HINT} ({error})") from None
    return ray


def connect(address: str | None) -> Any:
    """Join the Ray cluster at ``address`` (``auto``, ``HOST:PORT``; None: ``RAY_ADDRESS`` or a new local
    instance), once per process; returns the ``ray`` module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    _check_reachable(address)
    try:
        # Task output reaches the driver (a task's warnings matter); Ray's own start-up chatter does not.
        env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        ray.init(
            address=address,
            runtime_env={"env_vars": env} if env else None,
            log_to_driver=True,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"cannot join the Ray cluster at {address or 'RAY_ADDRESS/local'}: {first}"
        ) from None
    return ray


def _check_reachable(address: str | None) -> None:
    """Fail fast on a ``HOST:PORT`` nothing listens on (Ray itself would keep retrying for minutes)."""
    if address is None or address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {error}") from None


def run_on_ray(
    pending: list[Any],
    guarded: Callable[[Any], Outcome],
    record: Callable[[Outcome], None],
    progress: Progress,
    address: str | None = None,
    actors: ActorSpec | None = None,
) -> None:
    """Run ``guarded(task)`` for every pending task on the cluster, handing each outcome to ``record``
    as it arrives and ticking ``progress`` (a line may be due) at least every ``WAKE_EVERY`` s; a task
    Ray gives up on (its node kept dying) is recorded as failed, the rest go on."""
    if not pending:
        return
    ray = connect(address)
    if actors is None:
        outcomes = _task_outcomes(ray, pending, guarded)
    else:
        outcomes = _actor_outcomes(ray, pending, guarded, actors)
    for outcome in outcomes:  # None: nothing finished for a while, a chance to report progress
        if outcome is not None:
            record(outcome)
        progress.tick()


def _task_outcomes(ray: Any, pending: list[Any], guarded: Callable) -> Iterator[Outcome | None]:
    """One Ray task per pending task (1 CPU each); outcomes in completion order. At most ``IN_FLIGHT``
    tasks are submitted at a time, so a job of millions of shards does not flood the driver and the GCS
    (yet enough wait that an autoscaler sees the demand)."""
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(_call)
    fn_ref = ray.put(guarded)  # pickled once, not once per task
    queue, names = iter(pending), {}
    while True:
        for task in islice(queue, IN_FLIGHT - len(names)):
            names[remote.remote(fn_ref, task)] = task.name
        if not names:
            return
        yield from _finished(ray, names)


def _finished(ray: Any, names: dict[Any, str]) -> Iterator[Outcome | None]:
    """The outcomes of every task of ``names`` finished now, waiting up to ``WAKE_EVERY`` s for the
    first (None when none finished); finished refs leave ``names``."""
    refs = list(names)
    done, _ = ray.wait(refs, num_returns=1, timeout=WAKE_EVERY)
    if not done:
        yield None
        return
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # everything else ready too
    for ref in done:
        yield _outcome(ray, ref, names.pop(ref))


def _call(guarded: Callable[[Any], Outcome], task: Any) -> Outcome:
    return guarded(task)


class _TaskActor:
    """A long-lived worker process: ``setup`` once, then one task per ``run`` call."""

    def __init__(self, setup: Callable[[], Any] | None) -> None:
        if setup is not None:
            setup()

    def run(self, guarded: Callable[[Any], Outcome], task: Any) -> Outcome:
        return guarded(task)


def _actor_outcomes(
    ray: Any, pending: list[Any], guarded: Callable, spec: ActorSpec
) -> Iterator[Outcome | None]:
    """Stream the tasks to a pool of actors, two in flight each (no idle gap between tasks)."""
    options = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}
    restarts = {"max_restarts": ACTOR_RESTARTS, "max_task_retries": ACTOR_RESTARTS}
    actor_class = ray.remote(**options, **restarts)(_TaskActor)
    pool = [actor_class.remote(spec.setup) for _ in range(_actor_count(ray, spec, len(pending)))]
    fn_ref, queue, running = ray.put(guarded), list(reversed(pending)), {}

    def submit(actor: Any) -> None:
        if queue:
            task = queue.pop()
            running[actor.run.remote(fn_ref, task)] = (task.name, actor)

    for actor in pool * 2:
        submit(actor)
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=WAKE_EVERY)
            if not done:
                yield None
                continue
            name, actor = running.pop(done[0])
            yield _outcome(ray, done[0], name)
            submit(actor)
    finally:
        for actor in pool:
            ray.kill(actor)


def _actor_count(ray: Any, spec: ActorSpec, tasks: int) -> int:
    """``spec.count``, else as many actors as the cluster's GPUs (or CPUs) hold; never more than tasks."""
    if spec.count is not None:
        count = spec.count
    else:
        resources = ray.cluster_resources()
        kind, each = ("GPU", spec.num_gpus) if spec.num_gpus else ("CPU", spec.num_cpus)
        count = int(resources.get(kind, 0) // each)
    return max(1, min(count, tasks))


def _outcome(ray: Any, ref: Any, name: str) -> Outcome:
    """A finished task's outcome; a Ray error (lost node or crashed worker past its retries) is its failure."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        text = str(error).strip()
        return name, 0, f"{type(error).__name__}: {text.splitlines()[0] if text else 'lost'}", 0
