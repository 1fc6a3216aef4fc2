"""SIGUSR1 / SIGTERM mid-run: the current step is checkpointed, the process exits 0, SLURM jobs are
requeued, and `resume=latest` continues exactly where the signal stopped the run.

The exit status under a signal is checked on the real entry point (torchrun and launch/torchrun.sh); the
single-process SLURM requeue runs in this process, without ~10 s of start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, TINY, one_torch_thread, process_state_kept, read_jsonl, torchrun

from pretrain.torchrun import children

STEPS = 15
"""Enough that a run signalled after step 3 is still training when the stop lands (one step later on every
rank); every step more is only time, in the resumed run above all."""
ARGS = [
    "-m", "pretrain.train", "--config", str(TINY), f"train.steps={STEPS}", "train.batch_size=8",
    "log.every=1", "checkpoint.every=1000", "checkpoint.keep=5",
]  # fmt: skip


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path) if "loss" in r] if path.is_file() else []


def start(run_dir: Path, nproc: int, env: dict, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`pretrain.train` (under torchrun for `nproc` > 1) in a session of its own: a process group a test
    signals as a terminal does."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    )
    cmd = [sys.executable, *launcher, *ARGS, *extra, f"run.dir={run_dir.parent}", f"run.name={run_dir.name}"]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    full_env["PATH"] = f"{env.get('PATH', '')}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return spawn(cmd, full_env)


def spawn(cmd: list[str], env: dict) -> subprocess.Popen:
    """`cmd` from the checkout in a session of its own (a process group a test signals as a terminal does),
    its output read as one text stream. SIGINT as a terminal's foreground job has it, even where the suite runs
    as a background job (`make test &`), which starts with SIGINT ignored and hands that to every child."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def interrupt(proc: subprocess.Popen, run_dir: Path, target: int, sig: signal.Signals) -> str:
    """Signal `target` (a pid; minus a process group's id: every process in it) once step 3 is logged;
    returns the output after the process ended."""
    deadline = time.time() + 120
    while not logged_steps(run_dir) or logged_steps(run_dir)[-1] < 3:
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be signalled"
        time.sleep(0.05)
    os.kill(target, sig)
    out, _ = proc.communicate(timeout=120)
    return out


def assert_stopped_with_checkpoint(status: int, out: str, run_dir: Path) -> int:
    assert status == 0, out[-3000:]
    stopped = int((run_dir / "checkpoints/latest").read_text().split("_")[1])
    assert 3 <= stopped < STEPS
    assert logged_steps(run_dir)[-1] <= stopped
    return stopped


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_all_ranks_with_a_checkpoint_and_resume_continues(tmp_path):
    run_dir = tmp_path / "preempted"
    proc = start(run_dir, nproc=2, env={})
    time.sleep(0.5)
    while len(children(proc.pid)) < 2:  # torchrun's workers: signal only one of them
        time.sleep(0.1)
    out = interrupt(proc, run_dir, children(proc.pid)[-1], signal.SIGUSR1)
    stopped = assert_stopped_with_checkpoint(proc.returncode, out, run_dir)

    # the resume's ranks need no signals from a launcher: forked ranks, without torchrun's start-up
    done = torchrun(2, [*ARGS, f"run.dir={tmp_path}", "run.name=preempted", "resume=latest"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints/latest").read_text() == f"step_{STEPS:08d}"
    assert (run_dir / f"checkpoints/step_{stopped:08d}").is_dir()


def test_sigterm_single_process_checkpoints_and_requeues_under_slurm(tmp_path, monkeypatch, capsys):
    """`pretrain.train` in this process, SIGTERM raised right after step 3: the stop lands on that step
    (one process needs no agreement), with its checkpoint, status 0 and `scontrol requeue JOB`."""
    from pretrain import train
    from pretrain.training.trainer import Trainer

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol.calls"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    step = Trainer.train_step

    def signalled_after_step_3(self: Trainer):
        loss = step(self)
        if self.state.step == 3:
            # the trainer's handler must be there: the default action would end pytest itself
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            signal.raise_signal(signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "train_step", signalled_after_step_3)
    run_dir = tmp_path / "requeued"
    with process_state_kept(), one_torch_thread():
        status = train.main([*ARGS[2:], f"run.dir={tmp_path}", "run.name=requeued"])
    assert assert_stopped_with_checkpoint(status, capsys.readouterr().err, run_dir) == 3
    assert logged_steps(run_dir) == [1, 2, 3]
    assert calls.read_text().split() == ["requeue", "4242"]


def test_sigusr1_to_torchrun_launcher_is_forwarded_to_the_workers(tmp_path):
    """launch/torchrun.sh makes torchrun forward SIGUSR1 (SLURM's warning) to every worker."""
    run_dir = tmp_path / "launched"
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), *ARGS[2:], f"run.dir={tmp_path}", "run.name=launched"]
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    proc = spawn(cmd, env)
    out = interrupt(proc, run_dir, proc.pid, signal.SIGUSR1)  # torchrun.sh execs its torchrun: same pid
    stopped = int((run_dir / "checkpoints/latest").read_text().split("_")[1])
    assert 3 <= stopped < STEPS, out[-3000:]


def test_a_signal_during_start_up_is_kept_for_the_trainer():
    """pretrain.train catches the signals before its slow imports; the Preemption made later sees them."""
    from pretrain.training.preemption import SIGNALS, Preemption, catch_early

    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        catch_early()
        os.kill(os.getpid(), signal.SIGUSR1)  # without catch_early, the default action ends the process
        preemption = Preemption()
        assert preemption.should_stop()
        preemption.close()
        assert not Preemption().should_stop()  # consumed: a later trainer in this process starts clean
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def assert_one_ctrl_c_line(out: str) -> None:
    """What a person sees: one line about the Ctrl-C (not one per rank or data worker), no traceback."""
    lines = [line for line in out.splitlines() if "Ctrl-C" in line]
    assert len(lines) == 1 and "stopping after this step with a checkpoint" in lines[0], out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(demo_data, tmp_path):
    """Ctrl-C as a terminal sends it, to the whole process group: the trainer and its two data workers. The
    step ends, a checkpoint of it is written, the process exits 0 with one line about it, and the workers
    (which leave the signal to the trainer) neither print it again nor break the batches still to come."""
    run_dir = tmp_path / "ctrl-c"
    shards = f"data.train={demo_data}/train/{{00000..00003}}.tar"
    proc = start(run_dir, nproc=1, env={}, extra=(shards, "data.workers=2"))
    out = interrupt(proc, run_dir, -proc.pid, signal.SIGINT)
    assert_stopped_with_checkpoint(proc.returncode, out, run_dir)
    assert_one_ctrl_c_line(out)


def test_second_ctrl_c_stops_now_without_a_checkpoint(monkeypatch, capsys):
    """The second Ctrl-C ends the process at once with status 130 and one line. In this process, with
    `os._exit` caught: with real signals the second one would have to land before the step under way ends,
    which no step length makes certain on a busy machine."""
    from pretrain.training import preemption

    exits = []

    def exit_(status: int):
        exits.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(preemption.os, "_exit", exit_)
    # as in a foreground process, even where the suite runs as a background job (SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT)
    stops = preemption.Preemption()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stops.should_stop() and stops.stop == preemption.INTERRUPTED and not exits
        with pytest.raises(SystemExit):
            signal.raise_signal(signal.SIGINT)
    finally:
        stops.close()
        restored = signal.signal(signal.SIGINT, previous)
    assert exits == [130]
    assert capsys.readouterr().err.splitlines()[-1] == preemption.SECOND_CTRL_C
    assert restored is before


def test_ctrl_c_is_not_caught_where_it_was_ignored():
    """A shell starts background jobs with SIGINT ignored, so that Ctrl-C does not reach them: it stays so."""
    from pretrain.training.preemption import Preemption

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stops = Preemption()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stops.close()
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.slow
def test_ctrl_c_to_torchrun_launcher_stops_every_rank_with_a_checkpoint_and_exit_0(tmp_path):
    """launch/torchrun.sh given a terminal's Ctrl-C (its process group: the script's torchrun alone, as each
    rank has a session of its own): pretrain.torchrun relays it to the ranks, which checkpoint the step and
    exit 0, and so does the launcher, with one line about it and no traceback."""
    run_dir = tmp_path / "launched"
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), *ARGS[2:], f"run.dir={tmp_path}", "run.name=launched"]
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    proc = spawn(cmd, env)
    out = interrupt(proc, run_dir, -proc.pid, signal.SIGINT)
    assert_stopped_with_checkpoint(proc.returncode, out, run_dir)
    assert_one_ctrl_c_line(out)
