"""One module per `pretrain` subcommand, as `webshards.args.CommandLine` reads them; `pretrain.cli` lists them.
Implementations are imported inside `run`, so that `--help` and a bad flag answer before torch is imported."""
