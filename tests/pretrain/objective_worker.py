"""Run under torchrun by test_objective.py: `pretrain.train` with the captioning stand-in objective of
test_objective.py in place of `build_objective` (arguments as for `python -m pretrain.train`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `helpers`, which test_objective imports

from test_objective import caption_objective  # noqa: E402  (this folder is sys.path[0] for a script)

import pretrain.trainer  # noqa: E402
from pretrain.train import main  # noqa: E402

pretrain.trainer.build_objective = caption_objective

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
