"""Entry point: `python -m pretrain.train --config FILE [section.key=value ...]` (also under torchrun)."""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.config import ConfigError, load_config
from webshards.args import OneLineParser, say_interrupted

KEYS_EPILOG = (
    "Every config key, its default and its meaning: docs/training.md (Config), or run "
    "`pretrain config [--config FILE] [section.key=value ...]` to print the resolved config, one "
    "`section.key: value  # meaning` line per key."
)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """--config FILE and the dotted overrides, shared by `pretrain train` and `pretrain config`."""
    parser.add_argument("--config", help="YAML run config (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.epilog = KEYS_EPILOG


def run(config: str | None, overrides: list[str]) -> int:
    """Load the config, train, close; errors a user can fix become one line and a non-zero exit."""
    from pretrain.training.preemption import catch_early, requeue_slurm_job

    catch_early()  # before the slow imports and start-up: SLURM or torchrun may signal at any time
    try:  # a config error is one line in a second, before torch and open_clip are imported
        cfg = load_config(config, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    from pretrain.data.stream import DataError
    from pretrain.training.remote import RemoteError
    from pretrain.training.state import RunDirError
    from pretrain.training.telemetry import NonFiniteLossError
    from pretrain.training.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (ConfigError, RunDirError, FileNotFoundError, NotImplementedError, ValueError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except (NonFiniteLossError, DataError, RemoteError) as e:  # RemoteError: the last copy failed
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    if trainer.preempted and trainer.info.is_main:  # not after a Ctrl-C: a person stopped the run
        requeue_slurm_job()  # a no-op outside SLURM; the requeued job resumes with resume=latest
    return 0


def interrupted(prog: str = "pretrain", error: KeyboardInterrupt | None = None) -> int:
    """Ctrl-C outside the training loop (start-up, eval, export): one line, from one rank, and status 130,
    instead of a traceback per rank."""
    return say_interrupted(prog, error, say=os.environ.get("RANK", "0") == "0")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="pretrain train", description="Train a CLIP model.")
    add_train_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args.config, args.overrides)
    except KeyboardInterrupt:
        return interrupted()


if __name__ == "__main__":
    sys.exit(main())
