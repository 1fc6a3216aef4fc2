"""Command-line wiring shared by the ``pretrain`` and ``data-tools`` commands: a top-level parser assembled
from one module per subcommand, dispatch to it, and errors as one line on stderr, never a usage dump."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NoReturn

_INVOCATION: dict[str, Any] = {}


def invocation() -> tuple[list[str], float] | None:
    """The command line (``PROG ARG ...``) and start time (epoch seconds) of the command this process runs, as
    ``CommandLine.main`` noted them; None outside a command (a library call). Lineage records carry them."""
    return (_INVOCATION["argv"], _INVOCATION["started"]) if _INVOCATION else None


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``COMMAND: error: MESSAGE``, and exit status 2.

    COMMAND is the first word of ``prog`` (``data-tools`` for ``data-tools build``), so every error of a
    command starts the same way, whichever subcommand's parser found it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")

    def format_help(self) -> str:
        if callable(self.description):  # a subcommand's DESCRIPTION that is costly to build: built when shown
            self.description = self.description()
        return super().format_help()


def say_interrupted(prog: str, error: KeyboardInterrupt | None = None, say: bool = True) -> int:
    """Ctrl-C: one line (with how far the command got, if it said) unless not ``say``, no traceback, and
    status 130 (128 + SIGINT, as a shell reports a process Ctrl-C ended)."""
    if say:
        print(f"{prog}: interrupted{f': {error}' if str(error or '') else ''}", file=sys.stderr, flush=True)
    return 130


@dataclass(frozen=True)
class CommandLine:
    """A command made of subcommands, one module each, named as the module (``_`` read as ``-``): ``HELP``
    (its line in the command's ``--help``), ``DESCRIPTION`` (optional: the top of its own ``--help``; a
    function returning it when building it is costly, called only when that help is shown),
    ``add_arguments(parser)``, ``run(args)`` (None, or what ``status`` turns into the exit status) and, to
    report errors its own way, ``ERRORS``. An error listed in ``errors`` (the first type that matches gives
    the exit status) is one line ``PROG: error: MESSAGE``, or ``PROG COMMAND: error:`` with
    ``error_names_command``."""

    prog: str
    description: str
    commands: tuple[ModuleType, ...]
    errors: tuple[tuple[type[Exception], int], ...]
    error_names_command: bool = False
    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter
    status: Callable[[Any], int] = int
    interrupted: Callable[[str, KeyboardInterrupt], int] = say_interrupted

    def build_parser(self) -> OneLineParser:
        """The parser of every subcommand, in the order of ``commands``."""
        parser = OneLineParser(prog=self.prog, description=self.description)
        subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for command in self.commands:
            name = command.__name__.rpartition(".")[2].replace("_", "-")
            description = getattr(command, "DESCRIPTION", None)
            sub = subparsers.add_parser(
                name, help=command.HELP, description=description, formatter_class=self.formatter_class
            )
            command.add_arguments(sub)
            sub.set_defaults(run=command.run, errors=getattr(command, "ERRORS", self.errors))
        return parser

    def main(self, argv: list[str] | None = None) -> int:
        """Parse ``argv`` (default: the process's), run the subcommand; returns the exit status."""
        _INVOCATION.update(argv=[self.prog, *(sys.argv[1:] if argv is None else argv)], started=time.time())
        try:
            args = self.build_parser().parse_args(argv)
        except SystemExit as exit_:  # --help (0) or a bad argument (2): already printed
            return exit_.code if isinstance(exit_.code, int) else 1
        try:
            result = args.run(args)
        except KeyboardInterrupt as error:
            return self.interrupted(self.prog, error)
        except BrokenPipeError:  # `COMMAND ... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0
        except Exception as error:
            status = next((status for kind, status in args.errors if isinstance(error, kind)), None)
            if status is None:
                raise
            where = f"{self.prog} {args.command}" if self.error_names_command else self.prog
            print(f"{where}: error: {error}", file=sys.stderr)
            return status
        return 0 if result is None else self.status(result)
