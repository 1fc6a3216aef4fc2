"""metrics.jsonl carries the contract fields; wandb (offline) and tensorboard receive the same metrics."""

from __future__ import annotations

import json
import sys

from helpers import TINY, read_jsonl, run_cmd, torchrun, train_in_process


def test_metrics_contract_fields_and_final_step(tmp_path, demo_data):
    run_dir = train_in_process(tmp_path, ["train.steps=7", "log.every=3", f"data.train={demo_data}/train/{{00000..00003}}.tar",
                               f"eval.zeroshot={demo_data}"])  # fmt: skip
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 7]  # the final step is always logged
    for r in train_rows:
        assert isinstance(r["step"], int) and isinstance(r["samples_seen"], int)
        assert all(isinstance(r[k], float) for k in ("loss", "lr", "samples_per_s"))
        assert r["samples_seen"] == r["step"] * 16 and r["data_skipped"] == 0
    evals = [r for r in rows if "eval" in r]
    assert evals[-1]["eval"] == "zeroshot" and evals[-1]["step"] == 7 and 0 <= evals[-1]["top1"] <= 1


def test_wandb_offline_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = train_in_process(
        tmp_path, ["train.steps=2", "log.every=1", "log.wandb=true", "log.tensorboard=true"]
    )
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))


def test_eval_split_across_ranks_equals_single_process_eval(tmp_path, demo_data):
    """With DDP each rank evaluates its share of the eval shards; the summed result is the whole set's."""
    args = ["-m", "pretrain.train", "--config", str(TINY), f"run.dir={tmp_path}", "train.steps=2", "train.batch_size=8",
            f"data.train={demo_data}/train/{{00000..00003}}.tar", f"eval.zeroshot={demo_data}", "eval.batch_size=10"]  # fmt: skip
    proc = torchrun(2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = [r for r in read_jsonl(tmp_path / "tiny/metrics.jsonl") if "eval" in r][-1]
    proc = run_cmd([sys.executable, "-m", "pretrain.cli", "eval", "--checkpoint", str(tmp_path / "tiny"),
                    "--zeroshot", str(demo_data)])  # fmt: skip
    single = json.loads(proc.stdout.strip().splitlines()[-1])
    assert distributed["samples"] == single["samples"] == 64
    assert (distributed["top1"], distributed["top5"]) == (single["top1"], single["top5"])
