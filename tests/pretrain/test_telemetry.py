"""What a log line tells a user watching a run: the telemetry keys of metrics.jsonl and the console line,
the gradient norm against an independent backward pass, and no host sync outside log steps."""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, read_jsonl, run_cmd, train_in_process

from pretrain.models.build import model_config
from pretrain.training.flops import train_flops_per_sample

TELEMETRY = ("samples_per_s", "data_wait", "step_time", "grad_norm", "peak_memory_gib", "eta_s")


def test_cli_run_logs_telemetry_keys(tmp_path):
    """The acceptance run: `pretrain train` on CPU writes every telemetry key; MFU is null on CPU."""
    proc = run_cmd([sys.executable, "-m", "pretrain.cli", "train", "--config", str(TINY), f"run.dir={tmp_path}",
                    "train.steps=6", "log.every=2", "train.batch_size=8"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_jsonl(tmp_path / "tiny/metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert all(isinstance(r[k], float) for k in TELEMETRY), r
        assert 0 <= r["data_wait"] <= 1 and r["grad_norm"] > 0 and r["step_time"] > 0
        assert r["samples_per_s"] == pytest.approx(8 / r["step_time"], rel=1e-6)  # one rank, batch 8
        assert r["eta_s"] == pytest.approx((6 - r["step"]) * r["step_time"], rel=1e-6)
        assert r["memory_kind"] == "cpu_max_rss" and r["mfu"] is None
        assert r["peak_memory_gib"] > 7.19e6 * 4 / 2**30  # at least tiny-clip's fp32 weights
    assert "step 2/6 (33%)" in proc.stdout and "samples/s" in proc.stdout and "eta " in proc.stdout
    # a console line after the first step too, long before `log.every` steps (metrics.jsonl keeps its cadence)
    first = r"step 1/6 \(17%\) \| loss [\d.]+ \| first step [\d.]+s \| start-up [\d.]+s \| eta \d+s"
    assert re.search(first, proc.stdout), proc.stdout


def reference_grad_norm(run_dir: Path) -> float:
    """The first step's gradient norm recomputed from scratch: the same seeded model and synthetic batch,
    one plain forward and backward, the 2-norm over all parameter gradients."""
    from pretrain.config import load_config
    from pretrain.data.synthetic import SyntheticSource
    from pretrain.loss import ClipLoss
    from pretrain.models.build import build_model, context_length, image_size

    cfg = load_config(run_dir / "config.yaml", [])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).model
    source = SyntheticSource(
        cfg.train.seed, cfg.train.batch_size, 0, 1, image_size(model), context_length(model)
    )
    images, texts = source.next_batch()
    ClipLoss()(*model(images, texts)[:3]).backward()
    return math.sqrt(
        sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    )


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])  # clipped (clip_grad_norm_) and unclipped (get_total_norm)
def test_grad_norm_is_the_pre_clip_global_norm(tmp_path, grad_clip):
    run_dir = train_in_process(
        tmp_path,
        ["train.steps=1", "train.batch_size=8", f"train.grad_clip={grad_clip}", "log.peak_tflops=0.001"],
    )
    (row,) = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert row["grad_norm"] == pytest.approx(reference_grad_norm(run_dir), rel=1e-4)
    assert row["grad_norm"] > grad_clip  # so the clipped run did clip: the logged norm is the pre-clip one
    # With a peak given, MFU = model FLOPs per second over the peak (FLOPs checked in test_flops.py).
    expected = train_flops_per_sample(model_config("tiny-clip")) * row["samples_per_s"] / 1e9
    assert row["mfu"] == pytest.approx(expected, rel=1e-6)


SYNC_CALLS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def test_no_host_sync_outside_log_steps(tmp_path, monkeypatch):
    """Count device-to-host reads (`.item()`, `float(t)`, `.cpu()`, …) made by the project's code
    (pretrain/) in each loop iteration: none on steps without a log line, some on log steps, one (its loss)
    on the first step's console line."""
    from pretrain.training.trainer import Trainer

    package = str(ROOT / "pretrain")
    calls: Counter = Counter()
    current = {"step": 0}

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                calls[current["step"]] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in SYNC_CALLS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    original_step = Trainer.train_step

    def train_step(self):
        current["step"] = self.state.step + 1  # calls until the next step belong to this loop iteration
        return original_step(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    train_in_process(tmp_path, ["train.steps=6", "log.every=3", "checkpoint.every=100", "train.batch_size=4"])
    assert [calls[s] for s in (2, 4, 5)] == [0, 0, 0] and calls[1] == 1, calls
    assert calls[3] > 0 and calls[6] > 0  # the counter sees the reads that log steps do make
