"""Every bench's small CPU mode runs and prints its table, so the scripts never rot (the numbers are not
checked: benchmarks are scripts, never timed tests). bench/loss_memory.py --small is run by
tests/pretrain/test_tiled_loss.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_export

from pretrain.adapt.registry import available

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run_bench(script: str, *args: str) -> str:
    """Run bench/SCRIPT with ARGS on this Python (this checkout first on the path); its stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_train_step_small(tmp_path):
    out = tmp_path / "train_step.json"
    run_bench("train_step.py", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-clip" and result["device"] == "cpu"
    assert result["ours"]["samples_per_s"] > 0 and result["open_clip"]["samples_per_s"] > 0
    assert "host_syncs" not in result["ours"]  # CUDA only


@pytest.mark.slow
def test_e2e_small(tmp_path):
    out = tmp_path / "e2e.json"
    run_bench("e2e.py", "--small", "--json", str(out))
    result = json.loads(out.read_text())
    for name in ("ours", "open_clip_train"):
        assert result[name]["samples_per_s"] > 0 and 0 <= result[name]["data_wait"] <= 1, result


@pytest.mark.slow
def test_data_loader_small():
    stdout = run_bench("data_loader.py", "--small")
    rows = [line.split("|") for line in stdout.splitlines() if line.split("|")[0].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [1], stdout
    assert all(float(cell) > 0 for cell in rows[0][1:]), stdout


def test_data_tools_small():
    stdout = run_bench("data_tools.py", "--small")
    assert "embed (tiny-clip, CPU, batch 256)" in stdout and "build (64 px)" in stdout
    for method in ("exact", "perceptual", "semantic"):
        assert f"dedup {method:<10} 2x items -> " in stdout, stdout


def test_summary_collects_what_gpu_sh_left(tmp_path):
    (tmp_path / "train_step.rc").write_text("0\n")
    (tmp_path / "train_step.s").write_text("12\n")
    (tmp_path / "train_step.json").write_text('{"ratio": 1.5}')
    (tmp_path / "train_step.txt").write_text("table\nratio (ours / open_clip): 1.50\n")
    (tmp_path / "e2e.rc").write_text("124\n")  # stopped by its time cap
    run_bench("summary.py", str(tmp_path), "cpu")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["date"].endswith("+00:00")
    assert summary["benches"]["train_step"] == {
        "rc": 0, "seconds": 12, "results": {"ratio": 1.5}, "tail": ["table", "ratio (ours / open_clip): 1.50"]
    }  # fmt: skip
    assert summary["benches"]["e2e"]["rc"] == 124 and set(summary["benches"]) == {"train_step", "e2e"}


def test_checkpoint_manifest_small():
    stdout = run_bench("checkpoint_manifest.py", "--small")
    assert "crc32" in stdout and "manifest cost" in stdout and "verify (resume/eval)" in stdout


def test_adapt_small(tmp_path):
    """bench/adapt.py on a random tiny-clip export (no demo training): zero-shot rows and every available
    method's row for K 1, scores in percent."""
    export = write_export(tmp_path / "export")
    stdout = run_bench("adapt.py", "--small", "--work", str(tmp_path / "work"), "--checkpoint", str(export))
    rows = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}
    assert {"zero-shot", "zero-shot 1 prompt", *available()} <= set(rows), stdout
    for method in available():
        cells = [c.strip() for c in rows[method].split("|")[1:-1]]
        assert cells[1] == "1" and 0 <= float(cells[2]) <= 100, rows[method]


@pytest.mark.slow  # ~40 s of CPU: two trainers' start-up, an export, clip_benchmark's imports
def test_parity_smoke(tmp_path, demo_data):
    """bench/parity.py at a few steps for tiny-clip: both trainers ran the same number of steps, clip_benchmark
    scored both, and the table has a row (and a mean row) for each."""
    out = tmp_path / "parity.json"
    stdout = run_bench("parity.py", "--smoke", "--data", str(demo_data), "--json", str(out))
    results = json.loads(out.read_text())["results"]
    assert [(r["name"], r["trainer"], r["steps"]) for r in results] == [
        ("tiny-clip", "ours", 4), ("tiny-clip", "open_clip_train", 4)
    ], results  # fmt: skip
    for result in results:
        assert 0 <= result["top1"] <= 1 and 0 <= result["t2i_r5"] <= 1 and result["loss"] > 0, result
    rows = [line.split("|") for line in stdout.splitlines() if line.startswith("tiny-clip") and "|" in line]
    assert sorted((row[1].strip(), row[2].strip()) for row in rows) == [
        ("0", "open_clip_train"), ("0", "ours"), ("mean", "open_clip_train"), ("mean", "ours")
    ], stdout  # fmt: skip
