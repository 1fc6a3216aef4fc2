"""The one task runner for every data_tools job: a process pool locally, a rank/world split across nodes,
or a Ray cluster (``engine="ray"``, see ``engine_ray``), as one ``RunnerOptions`` says.

A job is a list of tasks, each with the one file whose existence marks it complete (written last, by the
task). Running a job again skips complete tasks, so a killed job resumes where it stopped (the local part
is ``webshards.tasks``); nodes given the same task list and their own rank each take a disjoint share, so
together they cover it once. The same property lets Ray rerun a task whose node died, on another node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from data_tools.engine_ray import ActorSpec, run_on_ray
from webshards.ranks import ranks_from_env
from webshards.tasks import RunSummary, Task, check_unique, in_pool, run_incomplete

log = logging.getLogger("data_tools")

ENGINES = ("local", "ray")
DEFAULT_PARTITIONS = 16
DEFAULT_PHASE_TIMEOUT = 24 * 3600.0


@dataclass(frozen=True)
class RunnerOptions:
    """How a job's tasks spread over processes and nodes, and how its phases wait for each other: what the
    shared flags of every runner command say (``commands.options.runner_options`` builds it once)."""

    workers: int = 1
    """Processes per node (``engine="local"``)."""
    rank: int | None = None
    """This node; None: from the environment (torchrun / SLURM), else 0."""
    world: int | None = None
    """Nodes; None: from the environment, else 1."""
    engine: str = "local"
    """local: a process pool here; ray: a Ray cluster."""
    ray_address: str | None = None
    """The Ray cluster to join; None: ``RAY_ADDRESS``, else a new local Ray."""
    partitions: int = DEFAULT_PARTITIONS
    """Multi-phase jobs (phases.py): partitions of the shuffle (reduce tasks per phase); results do not
    depend on it."""
    phase_timeout: float = DEFAULT_PHASE_TIMEOUT
    """Multi-phase jobs: seconds a node waits for other ranks to finish a phase before giving up."""
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    """Filled in by ``phases.run_phase``: seconds per phase on this node (its tasks plus the wait)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {self.partitions}")
        if not self.phase_timeout > 0:
            raise ValueError(f"phase_timeout must be positive, got {self.phase_timeout}")

    def ranks(self) -> tuple[int, int]:
        """This node's rank and the world size (see ``resolve_rank_world``)."""
        return resolve_rank_world(self.rank, self.world)

    @property
    def is_merger(self) -> bool:
        """Whether this node is rank 0, the one that merges a multi-phase job's last phase."""
        return self.ranks()[0] == 0


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
    options: RunnerOptions,
    *,
    desc: str = "",
    unit: str = "samples",
    task_unit: str = "shards",
    actors: ActorSpec | None = None,
) -> RunSummary:
    """Run this node's incomplete tasks with ``fn`` (returns samples processed); one failure stops no other.

    ``engine="local"``: ``workers`` processes here (``webshards.tasks.in_pool``). ``engine="ray"``: one Ray
    task per task on the cluster at ``ray_address``, or calls on long-lived ``actors`` (e.g. holding a model).
    Progress: tasks done of this node's pending ones, counted in ``task_unit``, and the ``unit`` (samples)
    they processed; a bar on a terminal, else a line every ``progress.every`` s.
    """
    check_unique([task.name for task in tasks])
    rank, world = options.ranks()
    on_ray = options.engine == "ray"
    execute = (
        partial(run_on_ray, address=options.ray_address, actors=actors)
        if on_ray
        else in_pool(options.workers)
    )
    node = f"{desc} rank {rank}/{world}" if world > 1 else desc
    mine = node_split(tasks, rank, world)
    # Ray: many nodes report to one driver log, so lines only, no bar
    return run_incomplete(
        mine,
        fn,
        execute,
        desc=node,
        unit=unit,
        task_unit=task_unit,
        logger=log,
        bar=False if on_ray else None,
    )
