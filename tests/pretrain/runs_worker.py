"""Run under torchrun by tests (`helpers.train_runs`): several training runs of configs/tiny.yaml one after
another in the same ranks, so that each costs its training (a second or two) and not a torchrun of its own
(~15 s, mostly importing torch and open_clip in every process).

argv[1] is a JSON list of steps, done in order:
  {"train": [overrides]}            `pretrain.train.run(configs/tiny.yaml, overrides)` on every rank
  {"cut_back": [src, dst, step]}    rank 0 copies run `src` to `dst` as if it had died after `step`'s
                                    checkpoint (`helpers.cut_back`); the other ranks wait for it
  {"move": [src, dst]}              rank 0 moves a folder away (a run directory lost with its node)
  {"remove": [path]}                rank 0 deletes a folder (e.g. a remote copy that never arrived)
A run that fails stops the worker with a non-zero exit and the error on stderr.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from helpers import TINY, cut_back

from pretrain.parallel.distributed import barrier, detect, init_distributed, shutdown
from pretrain.train import run


def main(steps: list[dict]) -> None:
    info = detect()
    # One process group for the worker's life: each Trainer joins it and leaves it up (a Trainer shuts down
    # only a group it created).
    init_distributed(info, torch.device("cpu"), "gloo")
    for number, step in enumerate(steps, 1):
        if "train" in step:
            status = run(str(TINY), step["train"])
            if status != 0:
                raise SystemExit(f"runs_worker: step {number} {step} exited {status}")
        elif info.is_main and "cut_back" in step:
            src, dst, cut = step["cut_back"]
            cut_back(Path(src), Path(dst), cut)
        elif info.is_main and "move" in step:
            shutil.move(*step["move"])
        elif info.is_main and "remove" in step:
            shutil.rmtree(*step["remove"])
        barrier()  # the next step starts on every rank with the files of this one in place
    shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
