"""Interrupted + resumed == uninterrupted: identical parameters and identical metrics on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, cli_output, read_jsonl, refused, train_in_process
from safetensors.torch import load_file

from pretrain.config import load_config
from pretrain.training.state import RunDirError
from pretrain.training.telemetry import NonFiniteLossError
from pretrain.training.trainer import Trainer

COMPARED = ("step", "samples_seen", "loss", "lr", "logit_scale", "data_skipped")


def assert_same_run(a: Path, b: Path, steps: int) -> None:
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [{k: r.get(k) for k in COMPARED} for r in ma] == [{k: r.get(k) for k in COMPARED} for r in mb]
    assert [r["step"] for r in ma if "loss" in r] == list(range(1, steps + 1))
    final = f"checkpoints/step_{steps:08d}/model.safetensors"
    pa, pb = load_file(a / final), load_file(b / final)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


@pytest.mark.parametrize(
    "data, extra",
    [
        ("synthetic", []),
        ("synthetic", ["train.accum_steps=2", "train.batch_size=8"]),
        ("shards", []),
        ("shards", ["data.decode=device"]),  # random crops on the device, replayed from the workers' seeds
    ],
)
def test_resume_equals_uninterrupted(tmp_path, demo_data, data, extra):
    train = f"{demo_data}/train/{{00000..00003}}.tar" if data == "shards" else "synthetic"
    overrides = [f"data.train={train}", "train.steps=8", "checkpoint.every=3", *extra]
    straight = train_in_process(tmp_path, name="straight", overrides=overrides)
    train_in_process(
        tmp_path, name="resumed", overrides=overrides, until=5
    )  # stops after step 5 with a checkpoint: an interruption
    resumed = train_in_process(tmp_path, name="resumed", overrides=[*overrides, "resume=latest"])
    assert_same_run(straight, resumed, steps=8)


def test_resume_from_explicit_checkpoint_path(tmp_path):
    overrides = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=5"]
    straight = train_in_process(tmp_path, name="straight", overrides=overrides)
    other = train_in_process(
        tmp_path, name="other", overrides=[*overrides, f"resume={straight}/checkpoints/step_00000004"]
    )
    a = load_file(straight / "checkpoints/step_00000006/model.safetensors")
    b = load_file(other / "checkpoints/step_00000006/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_pruned_and_latest_points_to_newest(tmp_path):
    run_dir = train_in_process(
        tmp_path, name="prune", overrides=["train.steps=7", "checkpoint.every=2", "checkpoint.keep=2"]
    )
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step_00000006", "step_00000007"]
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000007"
    assert (run_dir / "config.yaml").is_file()


def test_existing_run_is_never_overwritten(tmp_path):
    train_in_process(tmp_path, name="taken", overrides=["train.steps=2"])
    with pytest.raises(RunDirError, match="resume=latest"):
        train_in_process(tmp_path, name="taken", overrides=["train.steps=2"])


def test_resuming_another_models_checkpoint_is_one_line(tmp_path, capsys):
    """A run directory another model wrote (a smoke test's tiny model, then the real config with
    resume=latest): one line naming both models, exit 2, not a state_dict size-mismatch traceback."""
    run_dir = train_in_process(tmp_path, name="smoke", overrides=["train.steps=1"])
    args = ["--config", str(TINY), f"run.dir={tmp_path}", "run.name=smoke", "resume=latest"]
    line = refused(["train", *args, "model.name=tiny-siglip"], capsys)
    assert line == (
        f"pretrain: error: {run_dir}/checkpoints/step_00000001 was written by model 'tiny-clip', not this "
        "run's model.name 'tiny-siglip': resume it with that model, or start this run under another run.name"
    )


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=nan", "train.steps=10", "checkpoint.every=2"])
    trainer = Trainer(cfg)
    real_loss = trainer.objective.contrastive

    def poisoned(img, txt, scale, bias):
        loss = real_loss(img, txt, scale, bias)
        return loss * float("nan") if trainer.state.step >= 3 else loss

    trainer.objective.contrastive = poisoned
    with pytest.raises(NonFiniteLossError, match="last good checkpoint: step_00000002"):
        trainer.train()
    trainer.close()
    assert (cfg.run_dir / "checkpoints/latest").read_text() == "step_00000002"
    assert not (cfg.run_dir / "checkpoints/step_00000004").exists()


def test_cli_resume_latest_continues_a_finished_run(tmp_path, capsys):
    """`resume=latest` on a run that already reached train.steps does nothing and exits 0 (`pretrain train`
    in this process: test_config runs the entry point itself)."""
    args = ["train", "--config", str(TINY), f"run.dir={tmp_path}", "train.steps=2"]
    cli_output(args, capsys)
    cli_output([*args, "resume=latest", "train.steps=3"], capsys)
    steps = [r["step"] for r in read_jsonl(tmp_path / "tiny/metrics.jsonl")]
    assert steps == [2, 3]
