"""torchrun with a Ctrl-C that checkpoints: `python -m pretrain.torchrun [torchrun's arguments]`, what
launch/torchrun.sh runs.

torchrun starts each rank in a session of its own, so a terminal's Ctrl-C reaches torchrun alone. When it
handles SIGINT itself it relays it to the ranks and then always ends with a traceback and status 1, even
after the ranks checkpointed and exited 0. Here torchrun leaves SIGINT alone (launch/torchrun.sh does not
list it in `--signals-to-handle`) and this process passes each Ctrl-C on to the ranks: at the first they
finish the step, checkpoint and exit 0, and torchrun with them; at the second they are killed, and this
process ends with status 130 before torchrun could report them as failed. Every other signal is
torchrun's, as before. It also makes torchrun's restarts (`--max-restarts`) start from a clean store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from pretrain.training.preemption import SECOND_CTRL_C


def children(parent: int) -> list[int]:
    """The processes whose parent is `parent` (torchrun's ranks, for this process)."""
    if not os.path.isdir("/proc"):
        out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:  # "pid (name) state ppid ...": the ppid
            found.append(int(entry))
    return found


class CtrlC:
    """The SIGINT handler of the torchrun process: relays each Ctrl-C to the ranks."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame) -> None:
        self.count += 1
        ranks = children(os.getpid())
        if self.count == 1 and ranks:
            for pid in ranks:
                _kill(pid, signal.SIGINT)
            return
        # Again (or before the ranks started): stop now. Killed, not signalled: a rank that learnt of its
        # peer's exit inside a collective would print a traceback before its handler could run. Each rank
        # leads a process group, which holds its data workers. A checkpoint half written stays .tmp.
        for pid in ranks:
            _kill(pid, signal.SIGKILL, group=True)
        print(SECOND_CTRL_C if ranks else "pretrain: interrupted", file=sys.stderr, flush=True)
        os._exit(130)


def _kill(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if group else os.kill)(pid, sig)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # A restart (--max-restarts) must give the new workers a store of their own: sharing the rendezvous store
    # (torch's default) hands them the keys of the failed attempt, and a rank dials its dead peer's old address
    # (pytorch/pytorch#135712). Unshared, rank 0 of each attempt serves a fresh one.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    ctrl_c = CtrlC()
    signal.signal(signal.SIGINT, ctrl_c)
    try:
        torchrun.main(argv)
    except ChildFailedError:
        if not ctrl_c.count:
            raise
        return 130  # a rank still starting up when Ctrl-C came stopped at once (it said so, one line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
