"""CPU thread settings under contention: seconds per tiny training step, idle and beside a busy process.

Each setting runs in a fresh process (OpenMP reads its environment once, when torch loads): torch's default
(one OpenMP thread per core; a waiting thread spins a while before it sleeps), `OMP_NUM_THREADS=1`, and
`OMP_WAIT_POLICY=PASSIVE`
(threads sleep instead of spinning: what `pretrain` sets unless the environment says otherwise). "loaded" runs
the same steps while another process keeps one core busy, as a second job on a shared machine does. Prints
a table (median and slowest step). Run: `.venv/bin/python bench/threads.py [--steps 20] [--batch-size 32]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "torch default": {},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OMP_WAIT_POLICY=PASSIVE (pretrain's)": {"OMP_WAIT_POLICY": "PASSIVE"},
}
CHILD = """
import torch  # first: OpenMP starts with this process's environment, before pretrain sets its default
import json, sys, time
from pretrain.config import load_config
from pretrain.training.trainer import Trainer
steps, batch, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = load_config("configs/tiny.yaml", [f"run.dir={folder}", "data.train=synthetic", f"train.batch_size={batch}",
                                        f"train.steps={steps + 3}", "checkpoint.every=100000", "log.every=100000"])
trainer = Trainer(cfg)
times = []
for i in range(steps + 3):
    start = time.perf_counter()
    trainer.train_step().item()
    times.append(time.perf_counter() - start)
trainer.close()
print(json.dumps({"threads": torch.get_num_threads(), "times": times[3:]}))
"""


def run_setting(env: dict[str, str], steps: int, batch: int) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(steps), str(batch), folder],
            cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"bench/threads.py: the step process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=20, help="timed steps per setting (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="tiny-clip batch (default: %(default)s)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; tiny-clip, batch {args.batch_size}, {args.steps} steps per setting")
    print(f"{'setting':38} | {'load':6} | threads | median s/step | max s/step")
    print(f"{'-' * 38}-|--------|---------|---------------|-----------")
    for load in ("idle", "loaded"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "loaded" else None
        try:
            for name, env in SETTINGS.items():
                result = run_setting(env, args.steps, args.batch_size)
                median, worst = statistics.median(result["times"]), max(result["times"])
                print(f"{name:38} | {load:6} | {result['threads']:7} | {median:13.3f} | {worst:10.3f}")
        finally:
            if busy is not None:
                busy.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
