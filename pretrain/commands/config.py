"""`pretrain config`: the config `pretrain train` would run with, every key with its value and meaning."""

from __future__ import annotations

import argparse

from pretrain.config import describe_config, load_config
from pretrain.train import add_train_args

HELP = "print the resolved config: every key, its value and what it means"
DESCRIPTION = (
    "Print the config `pretrain train` would run with (defaults <- --config FILE <- overrides), one "
    "`section.key: value  # meaning` line per key of the schema."
)
add_arguments = add_train_args


def run(args: argparse.Namespace) -> None:
    """Print the resolved config; refuse what `pretrain train` would refuse."""
    from pretrain.models.build import check_pretrained, resolve_model_name

    cfg = load_config(args.config, args.overrides)
    check_pretrained(resolve_model_name(cfg.model.name), cfg.model.pretrained)
    print("\n".join(describe_config(cfg)))
