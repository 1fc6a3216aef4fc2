"""Contrastive image-text pretraining on open_clip (the `pretrain` command)."""

import os
import time

IMPORTED = time.perf_counter()
"""When the process first imported `pretrain` (what `pretrain` and `python -m pretrain.train` do first): the
start-up the first step's console line reports is counted from here, imports of torch and open_clip included."""

# OpenMP threads sleep while they wait instead of spinning, unless the environment chose: as fast as torch's
# default on idle cores, and 2.3x faster per CPU step beside one busy process (docs/PERFORMANCE.md, CPU
# threads). Set before torch loads; it has no effect if torch was imported first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
