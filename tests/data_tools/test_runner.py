"""The task runner: node split, rank/world resolution, skipping complete tasks, isolating failures."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from data_tools.cli import job_status
from data_tools.runner import RunnerOptions, RunSummary, Task, node_split, resolve_rank_world, run_tasks
from webshards import progress


def write_output(task: Task) -> int:
    """A task that fails for payload < 0 and otherwise writes its output, 'processing' payload samples."""
    if task.payload < 0:
        raise ValueError(f"bad payload {task.payload}")
    task.output.write_text(str(task.payload))
    return task.payload


def slow_task(task: Task) -> int:
    time.sleep(task.payload)
    task.output.write_text("done")
    return 1


def make_tasks(folder: Path, payloads: list[int]) -> list[Task]:
    return [Task(f"t{i}", folder / f"t{i}.done", payload) for i, payload in enumerate(payloads)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_node_split_is_disjoint_and_covering(tmp_path: Path, world: int) -> None:
    tasks = make_tasks(tmp_path, list(range(11)))
    shares = [node_split(tasks, rank, world) for rank in range(world)]
    names = [task.name for share in shares for task in share]
    assert sorted(names) == sorted(task.name for task in tasks) and len(names) == len(set(names))
    assert [task.name for task in shares[0]] == [f"t{i}" for i in range(0, 11, world)]  # stable order


def test_resolve_rank_world(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_rank_world(None, None) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert resolve_rank_world(None, None) == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_rank_world(None, None) == (1, 2)  # torchrun before SLURM
    assert resolve_rank_world(0, 3) == (0, 3)  # explicit arguments win
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank"):
            resolve_rank_world(rank, world)


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_is_reported_and_others_complete(tmp_path: Path, workers: int, caplog, monkeypatch) -> None:
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.0)  # a progress line at every task
    tasks = make_tasks(tmp_path, [3, -1, 5, 7])
    with caplog.at_level(logging.INFO, logger="data_tools"):
        summary = run_tasks(tasks, write_output, RunnerOptions(workers, 0, 1), desc="job")
    assert sorted(summary.done) == ["t0", "t2", "t3"] and summary.samples == 15
    assert summary.failed == [("t1", "ValueError: bad payload -1")] and not summary.ok()
    assert all(tasks[i].output.exists() for i in (0, 2, 3)) and not tasks[1].output.exists()
    assert "job: 3 done, 0 skipped, 1 failed" in caplog.text and "ValueError: bad payload -1" in caplog.text
    lines = "\n".join(caplog.messages)  # a line per task (the interval lowered to 0), then a last one
    assert re.search(
        r"^job: 2/4 shards \(50%\), \d+ samples, [\d.,]+ samples/s, elapsed \d+s, ETA \d+s$", lines, re.M
    )
    assert re.search(
        r"^job: 4/4 shards \(100%\), 15 samples, [\d.,]+ samples/s, elapsed \d+s, finished$", lines, re.M
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_lines_while_a_long_task_runs(tmp_path: Path, workers: int, caplog, monkeypatch) -> None:
    """Nothing finishes for a while (a long first shard): lines still come, with the total, in a pool or here."""
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.05)
    monkeypatch.setattr(progress, "TICK_SECONDS", 0.02)
    with caplog.at_level(logging.INFO, logger="data_tools"):
        run_tasks(make_tasks(tmp_path, [0.4, 0.4]), slow_task, RunnerOptions(workers, 0, 1), desc="embed")
    waiting = [line for line in caplog.messages if line.startswith("embed: 0/2 shards (0%)")]
    assert waiting and waiting[0].endswith("ETA unknown"), caplog.text


def test_complete_tasks_are_skipped(tmp_path: Path) -> None:
    tasks = make_tasks(tmp_path, [1, 2, 3])
    tasks[1].output.write_text("done before")
    summary = run_tasks(tasks, write_output, RunnerOptions(rank=0, world=1))
    assert summary.skipped == ["t1"] and summary.done == ["t0", "t2"] and summary.ok()
    assert tasks[1].output.read_text() == "done before"
    again = run_tasks(tasks, write_output, RunnerOptions(2, 0, 1))
    assert again.skipped == ["t0", "t1", "t2"] and again.done == [] and again.samples == 0


def test_nodes_together_run_every_task_once(tmp_path: Path) -> None:
    tasks = make_tasks(tmp_path, [1] * 7)
    summaries = [run_tasks(tasks, write_output, RunnerOptions(rank=rank, world=3)) for rank in range(3)]
    done = [name for summary in summaries for name in summary.done]
    assert sorted(done) == sorted(task.name for task in tasks) and len(done) == 7


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        run_tasks(make_tasks(tmp_path, [1]) * 2, write_output, RunnerOptions())
    with pytest.raises(ValueError, match="workers"):
        run_tasks(make_tasks(tmp_path, [1]), write_output, RunnerOptions(workers=0))


def test_cli_exit_status_of_a_job(capsys) -> None:
    assert job_status(RunSummary(done=["a"])) == 0
    assert job_status(RunSummary(done=["a"], failed=[("b", "OSError: disk full")])) == 1
    assert "1 task(s) failed" in capsys.readouterr().err


def interrupted_at_t1(task: Task) -> int:
    """Ctrl-C (KeyboardInterrupt) in the middle of the second task."""
    if task.name == "t1":
        raise KeyboardInterrupt
    return write_output(task)


def test_ctrl_c_says_how_far_the_job_got_and_a_rerun_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C is one line and status 130 from `data-tools`, saying how many tasks finished; the same job
    again runs only the rest."""
    from data_tools import cli
    from data_tools.commands import stats

    tasks = make_tasks(tmp_path, [1, 2, 3])
    monkeypatch.setattr(stats, "run", lambda args: run_tasks(tasks, interrupted_at_t1, RunnerOptions()))
    assert cli.main(["stats", "--shards", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "data-tools: interrupted: 1 of 3 tasks finished; the same command again skips the complete ones"
    ]
    summary = run_tasks(tasks, write_output, RunnerOptions())
    assert (summary.skipped, summary.done) == (["t0"], ["t1", "t2"])
