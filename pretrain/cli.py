"""`pretrain` command: train | config | eval | adapt | export | push | caption | plot, one module each in
pretrain/commands/. Thin: parse, dispatch."""

from __future__ import annotations

import sys

from pretrain.commands import adapt, caption, config, eval, export, plot, push, train
from pretrain.train import interrupted
from webshards.args import CommandLine
from webshards.retries import StoreUnreachable

COMMAND_LINE = CommandLine(
    prog="pretrain",
    description="Contrastive image-text pretraining (CLIP) on open_clip.",
    commands=(train, config, eval, adapt, export, push, caption, plot),  # in --help order
    errors=((StoreUnreachable, 1), (FileNotFoundError, 2), (ValueError, 2), (RuntimeError, 2)),
    error_names_command=True,
    interrupted=interrupted,
)


def main(argv: list[str] | None = None) -> int:
    """Run `pretrain`; returns the exit status: 0 on success, 2 when what the command was given is wrong, 1
    when the work itself failed (a training run: a non-finite loss, data it cannot read), 130 on Ctrl-C."""
    return COMMAND_LINE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
