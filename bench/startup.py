"""How long the commands take to answer when they do no work: `--help` and one-line refusals.

Each command runs `--repeat` times in a fresh process (the venv's console scripts); the table shows the
median and the slowest wall time and the exit status. A refusal should answer before torch and open_clip are
imported (issue 21: <= 2 s on an idle machine). Run: `.venv/bin/python bench/startup.py [--repeat 5]`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def commands(tmp: Path) -> list[tuple[str, list[str], int]]:
    """(label, argv, expected exit status) for each command measured."""
    missing = str(tmp / "nope")
    return [
        ("pretrain --help", ["pretrain", "--help"], 0),
        ("pretrain train --help", ["pretrain", "train", "--help"], 0),
        ("pretrain caption --help", ["pretrain", "caption", "--help"], 0),
        ("pretrain train: missing config", ["pretrain", "train", "--config", f"{missing}.yaml"], 2),
        ("pretrain train: unknown key", ["pretrain", "train", "--config", "configs/tiny.yaml", "train.stpes=3"], 2),
        ("pretrain bad flag", ["pretrain", "train", "--bogus"], 2),
        ("data-tools --help", ["data-tools", "--help"], 0),
        ("data-tools stats: missing shard", ["data-tools", "stats", "--shards", f"{missing}/00000.tar"], 2),
    ]  # fmt: skip


def measure(argv: list[str], repeat: int) -> tuple[list[float], int]:
    times, status = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        status = proc.returncode
    return times, status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (default: %(default)s)")
    args = parser.parse_args()
    wrong = 0
    print(f"{'command':34} | median s | max s | exit")
    print(f"{'-' * 34}-|----------|-------|-----")
    with tempfile.TemporaryDirectory() as tmp:
        for label, argv, expected in commands(Path(tmp)):
            times, status = measure(argv, args.repeat)
            flag = "" if status == expected else f" (expected {expected})"
            wrong += status != expected
            print(f"{label:34} | {statistics.median(times):8.2f} | {max(times):5.2f} | {status}{flag}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
