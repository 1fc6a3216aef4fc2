"""Run under torchrun by test_objective.py: `pretrain.train` with the captioning stand-in objective of
test_objective.py in place of `build_objective` (arguments as for `python -m pretrain.train`)."""

from __future__ import annotations

import sys
from pathlib import Path

# `helpers` (which test_objective imports) from tests/, after the checkout itself: tests/ first would make
# `pretrain` a namespace package of tests/pretrain and pretrain/, whose __init__.py never runs
TESTS = Path(__file__).resolve().parent.parent
sys.path[0:0] = [str(TESTS.parent), str(TESTS)]

from test_objective import caption_objective  # noqa: E402  (this folder is sys.path[0] for a script)

import pretrain.training.trainer  # noqa: E402
from pretrain.train import main  # noqa: E402

pretrain.training.trainer.build_objective = caption_objective

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
