"""Multi-rank jobs for tests, each rank forked from a process that has imported torch, open_clip and pretrain.

`torchrun --standalone --nproc_per_node N script args` costs ~15-20 s before a rank runs a line of the test: its
own start (importing torch) and each rank's imports (torch, torchvision, open_clip, timm: ~9 s of CPU), on 2
cores shared with the other test worker. Here the imports are paid once per test worker: a multiprocessing
forkserver preloads them, and each rank is a fork of it that gets what torchrun gives a rank (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK, ROLE_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_RUN_ID), the caller's environment, working directory and arguments, and runs the script or module
as `__main__`. As under torchrun, the ranks' stdout and stderr are the job's, a rank that fails ends the others,
and the job's status is 0 only when every rank's is.

What is under test in these jobs is the ranks' work (gathered losses, sharded checkpoints, split evaluation);
torchrun itself, its signals and its environment are tested with the real launcher (test_launch, test_preemption,
test_slurm).
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers import free_port

PRELOAD = ["torch", "torch.distributed", "open_clip", "pretrain.train", "pretrain.cli", "pretrain.evaluation"]
"""What every rank would import first (the forkserver ignores a module that fails to import)."""

_context = None


def context() -> multiprocessing.context.ForkServerContext:
    """This process's forkserver, started (and its modules imported) at the first job."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _rank(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked rank: torchrun's view of the world, then `argv` as `python argv...` would run it."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # multiprocessing made this process's start method its own (forkserver); a rank that torchrun starts has
    # the interpreter's default, which its data loader's workers use
    multiprocessing.set_start_method(None, force=True)
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as `python script.py` does
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # what an interpreter's exit runs (multiprocessing's child ends in os._exit)
        sys.stdout.flush()
        sys.stderr.flush()


def run(nproc: int, argv: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`argv` (a script and its arguments, or `-m module ...`) on `nproc` forked ranks; returns the job as a
    CompletedProcess (stdout, stderr: every rank's, as torchrun passes them on). Raises TimeoutExpired after
    `timeout` seconds, the ranks killed."""
    ctx = context()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        ranks = []
        for rank in range(nproc):
            rank_env = {
                **env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "TORCHELASTIC_RUN_ID": "forked-ranks",
            }  # fmt: skip
            process = ctx.Process(target=_rank, args=(argv, rank_env, str(cwd), str(out), str(err)))
            process.start()
            ranks.append(process)
        deadline, failed = time.monotonic() + timeout, False
        while any(p.exitcode is None for p in ranks):
            if time.monotonic() > deadline or failed:
                break
            multiprocessing.connection.wait([p.sentinel for p in ranks if p.exitcode is None], timeout=0.5)
            failed = any(p.exitcode not in (None, 0) for p in ranks)
        timed_out = any(p.exitcode is None for p in ranks) and not failed
        for p in ranks:  # a rank that failed leaves the others waiting in a collective: end them, as torchrun
            if p.exitcode is None:
                p.kill()
            p.join()
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    codes = [p.exitcode for p in ranks]
    if timed_out:
        raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
    status = 0 if all(c == 0 for c in codes) else 1
    if status:
        stderr += f"\nforked_ranks: exit codes by rank {codes}\n"
    return subprocess.CompletedProcess(argv, status, stdout, stderr)
