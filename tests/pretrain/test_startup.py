"""`pretrain`'s help and its config refusals answer before torch and open_clip are imported (~10 s of a
start-up otherwise): the property that keeps them under 2 s. bench/startup.py measures the times."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT

PROBE = """
import contextlib, io, sys
from pretrain.cli import main
statuses = []
for argv in (["--help"], ["train", "--help"], ["caption", "--help"], ["train", "--config", "configs/tiny.yaml",
             "train.stpes=3"], ["train", "--config", "missing.yaml"], ["train", "--bogus"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            statuses.append(main(argv))
        except SystemExit as e:
            statuses.append(e.code)
print(statuses, sorted(m for m in ("torch", "open_clip") if m in sys.modules))
"""


def test_help_and_config_refusals_do_not_import_torch():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[0, 0, 0, 2, 2, 2] []"
