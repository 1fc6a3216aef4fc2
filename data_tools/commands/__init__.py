"""One module per ``data-tools`` subcommand; ``data_tools.cli`` turns each into a subparser.

A module has ``HELP`` (its line in ``data-tools --help``), ``DESCRIPTION`` (the top of its own ``--help``),
``add_arguments(parser)`` and ``run(args)``. ``run`` returns the job's ``RunSummary`` when the subcommand
is a runner job, so that ``main`` turns failed tasks into the exit status, else None. Implementations are
imported inside ``run`` so that ``data-tools --help`` stays fast.
"""
