"""The Ray engine's parts that need no cluster: the CLI options, the one-line error without Ray, and how
many model actors a cluster holds (its progress lines are webshards.progress's, tests/webshards)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import free_port, write_image_folder

from data_tools import engine_ray
from data_tools.cli import main
from data_tools.engine_ray import ActorSpec, _actor_count
from data_tools.runner import RunnerOptions, Task, run_tasks


@pytest.mark.parametrize("command", ["build", "embed", "reshard", "filter", "dedup"])
def test_every_runner_job_takes_engine_options(command: str, capsys) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--engine {local,ray}" in text and "--ray-address auto|HOST:PORT" in text


@pytest.mark.parametrize("address", ["foo", "host:0", "host:99999", ":6379"])
def test_bad_ray_address_is_one_line(tmp_path: Path, address: str, capsys) -> None:
    argv = ["build", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--engine", "ray"]
    assert main([*argv, "--ray-address", address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1] == f"data-tools: error: argument --ray-address: expected auto or HOST:PORT, got '{address}'"
    )


def test_ray_address_needs_the_ray_engine(tmp_path: Path, capsys) -> None:
    argv = ["build", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--ray-address", "auto"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "data-tools: error: --ray-address needs --engine ray"


def test_missing_ray_is_one_clear_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    tasks = [Task("t0", tmp_path / "t0.done", 1)]
    with pytest.raises(ValueError, match=r"^--engine ray needs `pip install clip-pretrain\[ray\]`"):
        run_tasks(tasks, len, RunnerOptions(engine="ray"))


def test_unreachable_cluster_is_one_line_and_fast(tmp_path: Path, capsys) -> None:
    pytest.importorskip("ray")
    write_image_folder(tmp_path / "images", 1, corrupt=False)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    argv = ["build", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "out")]
    start = time.monotonic()
    assert main([*argv, "--engine", "ray", "--ray-address", address]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"data-tools: error: cannot reach the Ray cluster at {address}: ")


def test_unknown_engine_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="engine must be one of"):
        run_tasks([Task("t0", tmp_path / "t0.done", 1)], len, RunnerOptions(engine="spark"))


def test_usage_stats_are_off_unless_the_user_chose(monkeypatch) -> None:
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    engine_ray.import_ray()
    assert engine_ray.os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    engine_ray.import_ray()
    assert engine_ray.os.environ["RAY_USAGE_STATS_ENABLED"] == "1"


class FakeRay:
    def __init__(self, resources: dict[str, float]) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


@pytest.mark.parametrize(
    ("spec", "resources", "tasks", "expected"),
    [
        (ActorSpec(num_cpus=1), {"CPU": 2.0}, 10, 2),  # one per CPU
        (ActorSpec(num_cpus=2), {"CPU": 5.0}, 10, 2),
        (ActorSpec(num_gpus=1), {"CPU": 64.0, "GPU": 8.0}, 10, 8),  # one per GPU
        (ActorSpec(num_gpus=1), {"CPU": 64.0, "GPU": 8.0}, 3, 3),  # never more than tasks
        (ActorSpec(count=5), {"CPU": 2.0}, 10, 5),
        (ActorSpec(num_cpus=4), {"CPU": 2.0}, 10, 1),  # at least one (Ray waits for room)
    ],
)
def test_actor_count(spec: ActorSpec, resources: dict, tasks: int, expected: int) -> None:
    assert _actor_count(FakeRay(resources), spec, tasks) == expected


class Ref:
    def __init__(self, value) -> None:
        self.value = value


class FakeRuntime:
    """Enough of ``ray`` for ``_task_outcomes``: a task runs when submitted; counts what is in flight."""

    exceptions = SimpleNamespace(RayError=RuntimeError)

    def __init__(self) -> None:
        self.unread: set[int] = set()
        self.most_in_flight = 0

    def remote(self, **options):
        def decorate(fn):
            return SimpleNamespace(remote=lambda *args: self._submit(fn, *args))

        return decorate

    def _submit(self, fn, *args) -> Ref:
        ref = Ref(fn(*(a.value if isinstance(a, Ref) else a for a in args)))
        self.unread.add(id(ref))
        self.most_in_flight = max(self.most_in_flight, len(self.unread))
        return ref

    def put(self, value) -> Ref:
        return Ref(value)

    def wait(self, refs, num_returns, timeout):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        self.unread.discard(id(ref))
        if ref.value[0] == "lost":  # as Ray reports a task whose node kept dying past its retries
            raise self.exceptions.RayError("NodeDiedError: the node running the task died\nmore detail")
        return ref.value


def test_ray_tasks_are_submitted_in_a_bounded_window(monkeypatch) -> None:
    monkeypatch.setattr(engine_ray, "IN_FLIGHT", 3)
    runtime = FakeRuntime()
    tasks = [Task(f"t{i}", Path(f"t{i}"), i) for i in range(10)]
    outcomes = list(
        engine_ray._task_outcomes(runtime, tasks, lambda task: (task.name, task.payload, None, 0))
    )
    assert sorted(outcomes) == sorted((f"t{i}", i, None, 0) for i in range(10))
    assert runtime.most_in_flight == 3


def test_a_task_ray_gives_up_on_is_a_failure_and_the_rest_go_on() -> None:
    tasks = [Task(name, Path(name), 1) for name in ("t0", "lost", "t2")]
    outcomes = list(engine_ray._task_outcomes(FakeRuntime(), tasks, lambda task: (task.name, 1, None, 0)))
    assert outcomes == [
        ("t0", 1, None, 0),
        ("lost", 0, "RuntimeError: NodeDiedError: the node running the task died", 0),
        ("t2", 1, None, 0),
    ]
