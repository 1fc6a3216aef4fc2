"""metrics.jsonl carries the contract and telemetry fields; wandb (offline) and tensorboard receive the same keys."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from helpers import TINY, cli_output, read_jsonl, torchrun, train_in_process

TELEMETRY = ("samples_per_s", "data_wait", "step_time", "grad_norm", "peak_memory_gib", "eta_s")


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
        assert all(isinstance(r[k], float) for k in TELEMETRY) and 0 <= r["data_wait"] <= 1
        assert r["memory_kind"] == "cpu_max_rss" and r["mfu"] is None  # no peak FLOP/s known for a CPU
    evals = [r for r in rows if "eval" in r]
    assert evals[-1]["eval"] == "zeroshot" and evals[-1]["step"] == 7 and 0 <= evals[-1]["top1"] <= 1


def tensorboard_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return set(events.Tags()["scalars"])


def wandb_history_keys(run_file: Path) -> set[str]:
    """Keys of the history records in an offline `.wandb` file (LevelDB log format: 32 KiB blocks of
    records with a 7-byte header each, after wandb's own 7-byte file header), read without wandb's reader."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, buf, keys = run_file.read_bytes(), 32768, 7, b"", set()
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of a split one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            buf = b""
    return keys - {"_step", "_runtime", "_timestamp"}


def test_wandb_offline_and_tensorboard_get_the_jsonl_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = train_in_process(
        tmp_path,
        ["train.steps=2", "log.every=1", "log.wandb=true", "log.tensorboard=true", "train.batch_size=8"],
    )
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    numeric = {
        f"train/{k}" for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))
    }
    assert {f"train/{k}" for k in (*TELEMETRY, "loss", "lr")} <= numeric  # mfu is null on CPU: not sent
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert tensorboard_tags(run_dir / "tensorboard") == numeric
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and wandb_history_keys(next(offline_runs[0].glob("*.wandb"))) == numeric


def test_eval_split_across_ranks_equals_single_process_eval(tmp_path, demo_data, capsys):
    """With DDP each rank evaluates its share of the eval shards; the summed result is the whole set's."""
    args = ["-m", "pretrain.train", "--config", str(TINY), f"run.dir={tmp_path}", "train.steps=2", "train.batch_size=8",
            f"data.train={demo_data}/train/{{00000..00003}}.tar", f"eval.zeroshot={demo_data}", "eval.batch_size=10"]  # fmt: skip
    proc = torchrun(2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = [r for r in read_jsonl(tmp_path / "tiny/metrics.jsonl") if "eval" in r][-1]
    printed = cli_output(
        ["eval", "--checkpoint", str(tmp_path / "tiny"), "--zeroshot", str(demo_data)], capsys
    )
    single = json.loads(printed.strip().splitlines()[-1])
    assert distributed["samples"] == single["samples"] == 64
    assert (distributed["top1"], distributed["top5"]) == (single["top1"], single["top5"])
