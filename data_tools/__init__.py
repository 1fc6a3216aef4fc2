"""Curation tools (the `data-tools` command)."""

import os

# The same OpenMP default as pretrain's (pretrain/__init__.py): embedding on CPU beside other jobs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
