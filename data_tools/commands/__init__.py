"""One module per ``data-tools`` subcommand; ``data_tools.cli`` turns each into a subparser.

A module has what ``webshards.args.CommandLine`` reads: ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)``
and ``run(args)``. ``run`` returns the job's ``RunSummary`` when the subcommand is a runner job, so that
``main`` turns failed tasks into the exit status, else None. Implementations are imported inside ``run`` so
that ``data-tools --help`` stays fast.
"""
