"""Interrupted + resumed == uninterrupted: identical parameters and identical metrics on CPU."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, cli_output, one_torch_thread, read_jsonl, refused, train_in_process
from safetensors.torch import load_file

from pretrain.config import load_config
from pretrain.training.state import RunDirError
from pretrain.training.telemetry import NonFiniteLossError
from pretrain.training.trainer import Trainer

PIL_AUG = [
    "data.aug.color_jitter=[0.4,0.4,0.4,0.1]",
    "data.aug.color_jitter_prob=0.8",
    "data.aug.gray_scale_prob=0.2",
]
"""open_clip's jitter and grayscale: on PIL images in a worker process, whose Python `random` (what they draw
from) no checkpoint holds; each sample seeds it."""
TIMM_AUG = [
    "data.aug.use_timm=true",
    "data.aug.ratio=[0.5,2.0]",
    "data.aug.color_jitter=[0.4,0.4,0.4]",
    "data.aug.re_prob=0.5",
]
"""timm's crop, jitter and erasing, replayed on the device."""
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
        ("shards", ["data.workers=1", *PIL_AUG]),
        ("shards", ["data.decode=device", *TIMM_AUG]),
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


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """A 4-step run (cosine to 0, warmup 2) with checkpoints after steps 2 and 4; tests work on copies."""
    root = tmp_path_factory.mktemp("four")
    with one_torch_thread():
        return train_in_process(root, name="four", overrides=["train.steps=4", "checkpoint.every=2"])


def copy_of(run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(run, tmp / "run"))


def step_lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize(
    "changed",
    [
        ["train.steps=7"],
        [
            "train.steps=7",
            "train.lr=2e-3",
            "train.warmup_steps=3",
            "train.min_lr=1e-4",
            "train.weight_decay=0.1",
        ],
    ],
    ids=["steps", "schedule-keys"],
)
def test_an_extended_run_follows_the_schedule_of_its_new_settings(four_steps, tmp_path, caplog, changed):
    """The 4-step run resumed with `changed` uses, from the first resumed step on, exactly the rates of a run
    started with those settings (not the rate the saved schedule reached: 0, the end of its cosine). A changed
    weight decay is one the restored optimizer state overrides: said in a warning."""
    run = copy_of(four_steps, tmp_path)
    with one_torch_thread():
        extended = train_in_process(tmp_path, name=run.name, overrides=[*changed, "resume=latest"])
        straight = train_in_process(tmp_path, name="straight", overrides=changed)
    assert {s: step_lrs(extended)[s] for s in (5, 6, 7)} == {s: step_lrs(straight)[s] for s in (5, 6, 7)}
    kept = "train.weight_decay=0.1 is not used: the optimizer state of step_00000004 keeps its 0.2"
    assert (kept in caplog.text) == ("train.weight_decay=0.1" in changed)


# ---- verified checkpoints ------------------------------------------------------------------------------
def damage(path: Path, how: str) -> None:
    """`flip`: one bit of the middle byte changed, same size; `truncate`: the second half gone."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


def resumed_step(run: Path, *extra: str) -> int:
    """The step a `resume=latest` Trainer of `run` starts at (built, not trained: loading is under test)."""
    cfg = load_config(
        TINY, [f"run.dir={run.parent}", f"run.name={run.name}", "train.steps=8", "resume=latest", *extra]
    )
    trainer = Trainer(cfg)
    trainer.close()
    return trainer.state.step


class Killed(BaseException):
    """What the writer 'dies' of: nothing catches it, as nothing runs after a SIGKILL."""


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_current(four_steps, tmp_path, monkeypatch):
    """The save of step 6 dies after writing half of trainer.pt: step_00000006.tmp is left, which resume=latest
    ignores (the step 4 checkpoint is still `latest`), and the next save of step 6 replaces it."""
    run, real_save = copy_of(four_steps, tmp_path), torch.save

    def dying_save(obj, path, *args, **kwargs):
        if Path(path).name != "trainer.pt" or "step_00000006" not in str(path):
            return real_save(obj, path, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise Killed

    monkeypatch.setattr(torch, "save", dying_save)
    with one_torch_thread(), pytest.raises(Killed):
        train_in_process(
            tmp_path, name=run.name, overrides=["train.steps=6", "checkpoint.every=2", "resume=latest"]
        )
    monkeypatch.undo()
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest",
        "step_00000002",
        "step_00000004",
        "step_00000006.tmp",
    ]
    assert (checkpoints / "latest").read_text() == "step_00000004"
    with one_torch_thread():
        assert resumed_step(run) == 4


@pytest.mark.parametrize(
    "member, how, reason",
    [
        ("model.safetensors", "flip", "its crc32 differs from the one _COMPLETE lists (corrupted)"),
        ("trainer.pt", "flip", "its crc32 differs from the one _COMPLETE lists (corrupted)"),
        ("model.safetensors", "truncate", "bytes, _COMPLETE lists"),
    ],
    ids=["model-flipped", "trainer-flipped", "model-truncated"],
)
def test_a_damaged_newest_checkpoint_is_never_loaded(
    four_steps, tmp_path, capsys, caplog, member, how, reason
):
    """resume=latest falls back to step 2 with a warning naming the file and the reason, and sets step 4
    aside; an explicit path to it, `pretrain export` and `pretrain eval` refuse it in one line, exit 2."""
    run = copy_of(four_steps, tmp_path)
    bad = run / "checkpoints/step_00000004"
    damage(bad / member, how)
    args = ["--config", str(TINY), f"run.dir={tmp_path}", "run.name=other", "train.steps=8"]
    line = refused(["train", *args, f"resume={bad}"], capsys, not_made=tmp_path / "other")
    assert line.startswith(f"pretrain: error: {bad / member}: ") and reason in line
    out = tmp_path / "export"
    line = refused(["export", "--checkpoint", str(run), "--output", str(out)], capsys, not_made=out)
    assert line.startswith(f"pretrain export: error: {bad / member}: ") and reason in line
    line = refused(["eval", "--checkpoint", str(bad), "--zeroshot", str(tmp_path)], capsys)
    assert line.startswith(f"pretrain eval: error: {bad / member}: ") and reason in line

    with one_torch_thread():
        assert resumed_step(run) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"{bad / member}: " in w and reason in w and "trying the checkpoint before it" in w for w in warnings
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest",
        "step_00000002",
        "step_00000004.damaged",
    ]
    assert (run / "checkpoints/latest").read_text() == "step_00000002"


def test_with_no_intact_checkpoint_left_resume_is_one_line(four_steps, tmp_path, capsys):
    """Every checkpoint damaged (as with checkpoint.keep=1): one line, exit 2, nothing set aside (a rerun
    must not find an empty folder and start from step 0)."""
    run = copy_of(four_steps, tmp_path)
    for step in (2, 4):
        damage(run / f"checkpoints/step_{step:08d}/model.safetensors", "flip")
    args = [
        "train",
        "--config",
        str(TINY),
        f"run.dir={tmp_path}",
        "run.name=run",
        "train.steps=8",
        "resume=latest",
    ]
    line = refused(args, capsys)
    assert line.startswith(
        f"pretrain: error: resume=latest: no intact checkpoint in {run}/checkpoints: {run}/checkpoints/step_00000004/model.safetensors: "
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest",
        "step_00000002",
        "step_00000004",
    ]


def test_a_checkpoint_without_a_manifest_loads_unverified(four_steps, tmp_path, caplog):
    """Checkpoints saved before they carried `_COMPLETE` still resume, with a warning saying so."""
    run = copy_of(four_steps, tmp_path)
    (run / "checkpoints/step_00000004/_COMPLETE").unlink()
    with one_torch_thread():
        assert resumed_step(run) == 4
    assert (
        "step_00000004 has no _COMPLETE manifest (saved by an older version): loading it unverified"
        in caplog.text
    )
