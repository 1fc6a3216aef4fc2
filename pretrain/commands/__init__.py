"""One module per `pretrain` subcommand; `pretrain.cli` turns each into a subparser.

A module has what `webshards.args.CommandLine` reads: `HELP`, `DESCRIPTION`, `add_arguments(parser)` and
`run(args)` (its exit status, or None for 0). Implementations are imported inside `run` so that
`pretrain --help` and a bad flag answer before torch is imported.
"""
