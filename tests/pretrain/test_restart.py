"""Automatic restart: launch/torchrun.sh with MAX_RESTARTS, one of two ranks killed (SIGKILL) or hung (SIGSTOP)
at a step chosen at random. torchrun starts the group again, the new workers resume the newest checkpoint
without being told, and the run ends by itself with the weights of an uninterrupted run, bit for bit.

The step and the rank come from a seed shown in every assertion message (RESTART_SEED=N repeats a draw)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, read_jsonl, train_runs
from safetensors.torch import load_file

from pretrain.torchrun import children

STEPS = 12
EVERY = 3
"""Checkpoint cadence: the kill lands after at least one checkpoint, and the resumed run redoes few steps."""
ARGS = [f"train.steps={STEPS}", "train.batch_size=8", "log.every=1", f"checkpoint.every={EVERY}"]
TIMEOUT = 10
"""dist.timeout of the hang test: how long the healthy rank waits for the stopped one."""


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run: 2 ranks (forked, without torchrun's start-up), the same arguments."""
    root = tmp_path_factory.mktemp("straight")
    train_runs([{"train": [f"run.dir={root}", "run.name=straight", *ARGS]}])
    return root / "straight"


class Launch:
    """launch/torchrun.sh with 2 ranks and its default MAX_RESTARTS, its output read line by line with the time
    each line came."""

    def __init__(self, run_dir: Path, extra: tuple[str, ...] = ()) -> None:
        self.run_dir = run_dir
        cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--config", str(TINY), *ARGS, *extra,
               f"run.dir={run_dir.parent}", f"run.name={run_dir.name}"]  # fmt: skip
        env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable,
               "PYTHONWARNINGS": "ignore"}  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def rank_pid(self, rank: int) -> int:
        """The pid of the worker with RANK `rank` (torchrun.sh execs the torchrun whose children they are)."""
        for pid in children(self.proc.pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return pid
        raise AssertionError(f"no worker with RANK={rank} among {children(self.proc.pid)}")

    def wait_for_step(self, step: int) -> None:
        self.wait_until(lambda: step in logged_steps(self.run_dir))

    def wait_until(self, condition, poll: float = 0.05) -> None:
        deadline = time.monotonic() + 240
        while not condition():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(poll)

    def finish(self) -> int:
        try:
            status = self.proc.wait(timeout=300)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(timeout=10)
        (self.run_dir.parent / "launch.out").write_text(self.output())  # kept with a failed test's folder
        return status

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, pattern: str, after: float = 0.0) -> tuple[float, str]:
        """The time and text of the first output line after `after` that matches `pattern`."""
        found = next(((t, line) for t, line in self.lines if t > after and re.search(pattern, line)), None)
        assert found is not None, f"no line matching {pattern!r}:\n{self.output()[-3000:]}"
        return found


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path) if "loss" in r] if path.is_file() else []


def draw(name: str) -> tuple[str, int, int]:
    """(what to show, step, rank): the step after which to strike (one checkpoint at least before it, and
    steps left after it), and the rank, from RESTART_SEED or a fresh seed."""
    seed = int(os.environ.get("RESTART_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    step, rank = rng.randint(EVERY + 1, STEPS - 1), rng.randint(0, 1)
    return f"{name}: RESTART_SEED={seed} (rank {rank} after step {step})", step, rank


def assert_finished_like(run_dir: Path, straight: Path, status: int, launch: Launch, what: str) -> int:
    """Exit 0, every step logged once, the final weights equal to the straight run's; returns the resumed step."""
    out = launch.output()
    assert status == 0, f"{what}\n{out[-4000:]}"
    assert logged_steps(run_dir) == list(range(1, STEPS + 1)), what
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    a, b = load_file(run_dir / final), load_file(straight / final)
    assert a.keys() == b.keys(), what
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], what
    assert re.search(r"torchrun restart \d: resuming the newest checkpoint", out), f"{what}\n{out[-3000:]}"
    resumed = int(launch.first(r"resumed from \S+ at step \d+")[1].split()[-1])
    assert resumed % EVERY == 0, what
    return resumed


@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_which_resumes_and_ends_like_an_uninterrupted_run(
    tmp_path, straight
):
    """At a checkpoint step the kill lands while that checkpoint is being written (its .tmp folder there)."""
    what, step, rank = draw("SIGKILL")
    run_dir = tmp_path / "killed"
    launch = Launch(run_dir)
    launch.wait_for_step(1)
    pid = launch.rank_pid(rank)
    half_written = run_dir / f"checkpoints/step_{step:08d}.tmp"
    if step % EVERY == 0:
        launch.wait_until(lambda: half_written.exists() or half_written.with_suffix("").exists(), poll=0.005)
    else:
        launch.wait_for_step(step)
    killed, during_save = time.monotonic(), half_written.exists()
    os.kill(pid, signal.SIGKILL)
    status = launch.finish()
    resumed = assert_finished_like(run_dir, straight, status, launch, what)
    assert EVERY <= resumed <= step + 1, what  # a checkpoint of the first attempt, not a fresh start
    assert not during_save or resumed < step, what  # the half-written one was passed over, then written again
    assert list((run_dir / "checkpoints").glob("*.tmp")) == [], what
    back, _ = launch.first(rf"step {resumed + 1}/{STEPS}", after=killed)
    saving = " (during its checkpoint)" if during_save else ""
    print(
        f"{what}{saving}: resumed at step {resumed}, first resumed step {back - killed:.1f} s after the kill"
    )


@pytest.mark.slow
def test_a_hung_rank_fails_the_other_within_dist_timeout_and_the_group_restarts(tmp_path, straight):
    what, step, rank = draw("SIGSTOP")
    run_dir = tmp_path / "hung"
    launch = Launch(run_dir, (f"dist.timeout={TIMEOUT}",))
    launch.wait_for_step(step)
    stopped = time.monotonic()
    pid = launch.rank_pid(rank)
    os.kill(pid, signal.SIGSTOP)  # torchrun's SIGTERM waits; its SIGKILL 30 s later does not
    status = launch.finish()
    resumed = assert_finished_like(run_dir, straight, status, launch, what)
    failed, _ = launch.first("closing signal SIGTERM", after=stopped)  # torchrun saw the other rank fail
    launch.first(rf"Unable to shutdown process {pid} via 15, forcefully exiting via 9", after=failed)
    back, _ = launch.first(rf"step {resumed + 1}/{STEPS}", after=failed)
    # The healthy rank fails once a collective has waited dist.timeout (one it may have entered before the stop),
    # in its step or in the stop-flag exchange; then torchrun sees it exit. 12-14 s when measured.
    assert TIMEOUT / 2 <= failed - stopped <= TIMEOUT + 20, f"{what}: failed {failed - stopped:.1f} s after"
    print(
        f"{what}: failed {failed - stopped:.1f} s after the stop, first resumed step {back - stopped:.1f} s after"
    )


@pytest.fixture
def under_torchrun(monkeypatch):
    """torchrun's variables for attempt `count` of launch `run_id` (restarts allowed)."""

    def attempt(count: int, run_id: str = "launch-a") -> None:
        for key, value in (("RESTART_COUNT", count), ("RUN_ID", run_id), ("MAX_RESTARTS", 3)):
            monkeypatch.setenv(f"TORCHELASTIC_{key}", str(value))

    return attempt


def test_a_restart_resumes_unasked_only_after_its_launch_passed_the_checks(tmp_path, under_torchrun):
    from pretrain.config import load_config
    from pretrain.training.restart import LAUNCH_FILE, record_launch, resume_after_restart

    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=run"])
    cpu = torch.device("cpu")
    (cfg.run_dir / "checkpoints/step_00000003").mkdir(parents=True)
    (cfg.run_dir / LAUNCH_FILE).write_text("launch-a")  # an earlier launch's
    under_torchrun(0)
    assert resume_after_restart(cfg, True, cpu) is cfg  # a first attempt: today's checks, which refuse here
    assert not (cfg.run_dir / LAUNCH_FILE).exists()
    under_torchrun(1)
    assert resume_after_restart(cfg, True, cpu).resume is None  # its first attempt was refused: so is it
    record_launch(cfg)  # what the first attempt does once the checks passed
    assert resume_after_restart(cfg, True, cpu).resume == "latest"
    under_torchrun(1, "launch-b")
    assert resume_after_restart(cfg, True, cpu).resume is None  # another launch's file
    under_torchrun(2)
    assert resume_after_restart(cfg, True, cpu).resume == "latest"


def test_a_restart_keeps_a_given_starting_point_until_the_run_has_a_checkpoint(tmp_path, under_torchrun):
    from pretrain.config import load_config
    from pretrain.models.checkpoint import complete_checkpoints
    from pretrain.training.restart import record_launch, resume_after_restart

    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=run", "resume=/elsewhere/step_00000100"])
    cfg.run_dir.mkdir()
    under_torchrun(1)
    record_launch(cfg)
    (cfg.run_dir / "checkpoints/step_00000003.tmp").mkdir(parents=True)  # a rank died while writing it
    assert complete_checkpoints(cfg.run_dir / "checkpoints") == []
    assert resume_after_restart(cfg, True, torch.device("cpu")).resume == "/elsewhere/step_00000100"
    (cfg.run_dir / "checkpoints/step_00000003").mkdir()
    assert resume_after_restart(cfg, True, torch.device("cpu")).resume == "latest"


def test_the_launch_is_recorded_only_where_torchrun_may_restart(tmp_path, monkeypatch, under_torchrun):
    from pretrain.config import load_config
    from pretrain.training.restart import LAUNCH_FILE, record_launch

    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=run"])
    cfg.run_dir.mkdir()
    record_launch(cfg)  # one process, no torchrun
    under_torchrun(0)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    record_launch(cfg)
    assert not (cfg.run_dir / LAUNCH_FILE).exists()
