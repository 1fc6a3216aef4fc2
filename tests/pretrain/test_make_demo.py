"""`make demo`'s program end to end: fresh data, train tiny-clip on CPU, zero-shot >= 0.90, export, timings.

This is the README's first command (minus venv set-up), so it runs in `make test`: about 4 minutes on
2 cores.
"""

from __future__ import annotations

import re
import sys

import pytest
from helpers import run_cmd


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the subprocess's own limit below; pytest's default (600 s) would cut it first
def test_demo_reaches_target_and_prints_its_time(tmp_path):
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "pretrain.demo",
            "--data",
            str(tmp_path / "data"),
            f"run.dir={tmp_path / 'runs'}",
        ],
        timeout=1800,  # ~4 minutes alone on 2 cores; generous for a loaded machine
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    top1 = float(re.search(r"zero-shot top-1\s+([0-9.]+)", proc.stdout).group(1))
    assert top1 >= 0.90
    assert re.search(r"time: total\s+[0-9.]+ s", proc.stdout)
    assert (tmp_path / "runs/demo/export/open_clip_model.safetensors").is_file()
    curves = tmp_path / "runs/demo/curves.png"
    assert re.search(rf"curves\s+{re.escape(str(curves))}\n", proc.stdout)
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from pretrain.plot import plot_run

    _, titles = plot_run(tmp_path / "runs/demo", tmp_path / "again.png")
    assert titles[:4] == ["loss", "lr", "samples/s", "data wait"]
    assert "eval zeroshot: topk" in titles  # top1 and top5 of the demo's zero-shot eval


def test_demo_stopped_by_a_signal_says_so_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    import pretrain.demo as demo

    class StoppedTrainer:  # what a SIGTERM leaves: train() returns early, without the final evaluation
        preempted = True

        def __init__(self, cfg) -> None:
            pass

        def train(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(demo, "Trainer", StoppedTrainer)
    monkeypatch.setattr(demo, "write_demo_data", lambda folder: None)
    (tmp_path / "demo.json").write_text('{"train": "train/{00000..00001}.tar"}')
    assert demo.main(["--data", str(tmp_path), f"run.dir={tmp_path}"]) == 1
    assert "stopped by a signal before the final evaluation" in capsys.readouterr().out
