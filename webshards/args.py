"""Command-line parsing shared by the ``pretrain`` and ``data-tools`` commands: a bad flag or value is one
line on stderr and exit status 2, never a usage dump."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``COMMAND: error: MESSAGE``, and exit status 2.

    COMMAND is the first word of ``prog`` (``data-tools`` for ``data-tools build``), so every error of a
    command starts the same way, whichever subcommand's parser found it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")
