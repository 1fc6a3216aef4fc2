"""`pretrain train`: what `python -m pretrain.train` runs."""

from __future__ import annotations

import argparse

from pretrain.train import add_train_args
from pretrain.train import run as train

HELP = "train a model from a YAML config"
ERRORS = ()  # `pretrain.train.run` reports the errors a user can fix itself; any other keeps its traceback
add_arguments = add_train_args


def run(args: argparse.Namespace) -> int:
    """Train; the exit status is `pretrain.train.run`'s."""
    return train(args.config, args.overrides)
