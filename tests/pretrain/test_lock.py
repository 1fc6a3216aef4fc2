"""Locked towers (`model.lock_image`, `model.lock_text`, open_clip's meaning): locked parameters are
bit-identical after training, the others change, the optimizer keeps no state for locked ones, and DDP,
FSDP2 and DeepSpeed ZeRO-2 train a LiT + partially locked text tower alike on 2 gloo ranks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, refused, train_runs

from pretrain.config import ConfigError, ModelConfig, load_config
from pretrain.models.build import build_model, load_trained
from pretrain.training.trainer import Trainer, seed_everything


def _strategy_helpers():
    """tests/pretrain/test_strategies.py's run and comparison helpers (the test folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "strategy_helpers", Path(__file__).with_name("test_strategies.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helpers = _strategy_helpers()
train_args, available, deepspeed_works = _helpers.train_args, _helpers.available, _helpers.deepspeed_works
assert_close_losses, assert_close_weights = _helpers.assert_close_losses, _helpers.assert_close_weights
STEPS = 5
IMAGE_STEM = ("visual.conv1.", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.")
TEXT_STEM = ("token_embedding.", "positional_embedding")
# What open_clip's groups lock in tiny-clip (2 blocks per tower), written out by hand: the reference.
EXPECTED_LOCKED = {
    "lit": lambda n: n.startswith("visual."),
    "image_groups_2": lambda n: n.startswith((*IMAGE_STEM, "visual.transformer.resblocks.0.")),
    "text_layers_2": lambda n: n.startswith((*TEXT_STEM, "transformer.resblocks.0.")),
    "both": lambda n: n.startswith(("visual.", *TEXT_STEM, "transformer.resblocks.0.")),
}
OVERRIDES = {
    "lit": ["model.lock_image=true"],
    "image_groups_2": ["model.lock_image=true", "model.lock_image_unlocked_groups=2"],
    "text_layers_2": ["model.lock_text=true", "model.lock_text_unlocked_layers=2"],
    "both": ["model.lock_image=true", "model.lock_text=true", "model.lock_text_unlocked_layers=2"],
}


def initial_weights() -> dict[str, torch.Tensor]:
    """tiny-clip as every run of configs/tiny.yaml starts (seed 0), built without any lock."""
    seed_everything(0)
    return {k: v.clone() for k, v in build_model(ModelConfig()).model.state_dict().items()}


def assert_locked_exactly(final: dict[str, torch.Tensor], start: dict[str, torch.Tensor], case: str) -> None:
    """Locked tensors bit-identical to the start, every other parameter moved."""
    locked = EXPECTED_LOCKED[case]
    for name, value in final.items():
        if locked(name):
            assert torch.equal(value, start[name]), f"{name} is locked but changed"
        else:
            assert not torch.equal(value, start[name]), f"{name} is trainable but did not change"


@pytest.mark.parametrize("case", ["lit", "image_groups_2", "text_layers_2"])
def test_locked_parameters_stay_and_get_no_optimizer_state(tmp_path, case):
    cfg = load_config(
        TINY, [f"run.dir={tmp_path}", f"train.steps={STEPS}", "train.batch_size=8", *OVERRIDES[case]]
    )
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    named = dict(trainer.model.named_parameters())
    assert {n for n, p in named.items() if not p.requires_grad} == {
        n for n in named if EXPECTED_LOCKED[case](n)
    }
    assert_locked_exactly(trainer.model.state_dict(), initial_weights(), case)
    with_state = {id(p) for p in trainer.optimizer.state}
    in_groups = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in named.values() if p.requires_grad}
    assert with_state == in_groups == trainable


@pytest.fixture(scope="module")
def locked_runs(tmp_path_factory) -> dict[str, Path]:
    """2-rank runs of a LiT image tower + a text tower locked but for its last 2 groups, one per strategy,
    in one torchrun."""
    root = tmp_path_factory.mktemp("locked")
    done = {strategy: root / strategy for strategy in available(["ddp", "fsdp", "deepspeed2"])}
    plan = [
        {"train": train_args(run, s, batch=4, extra=OVERRIDES["both"], steps=STEPS)}
        for s, run in done.items()
    ]
    train_runs(plan)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed2"])
def test_strategies_keep_locked_towers_and_agree(locked_runs, strategy):
    """FSDP2 with fully frozen units (the image blocks, text block 0) and a root of mixed frozen and
    trainable parameters, and ZeRO-2 partitioning only the trainable ones, train like DDP."""
    if strategy.startswith("deepspeed") and not deepspeed_works():
        pytest.skip("deepspeed is not installed (pip install '.[deepspeed]')")
    run = locked_runs[strategy]
    assert_locked_exactly(load_trained(run).model.state_dict(), initial_weights(), "both")
    if strategy != "ddp":
        assert_close_losses(run, locked_runs["ddp"], steps=STEPS)
        assert_close_weights(run, locked_runs["ddp"])


def test_frozen_bn_stats_keep_a_locked_tower_in_eval_mode(tmp_path):
    """open_clip turns a locked ResNet tower's BatchNorms into FrozenBatchNorm2d; the whole locked tower
    stays in eval mode through `model.train()` (a ViT's norms and dropout alike), the rest trains."""
    from open_clip.utils import FrozenBatchNorm2d

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-rn.json").write_text(json.dumps(config))
    cfg = ModelConfig(name=str(tmp_path / "tiny-rn.json"), lock_image=True, lock_image_freeze_bn_stats=True)
    model = build_model(cfg).model
    norms = [m for m in model.visual.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    model.train()
    assert not any(m.training for m in model.visual.modules())
    assert model.transformer.training
    vit = build_model(ModelConfig(lock_image=True, lock_image_freeze_bn_stats=True)).model.train()
    assert not vit.visual.training and vit.transformer.training


def test_coca_towers_lock_through_their_own_lock():
    """open_clip's CoCa has no lock_*_tower methods; its towers' `lock` gives the same meaning."""
    model = build_model(ModelConfig(name="tiny-coca", lock_image=True, lock_text=True)).model
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text_decoder", "logit_scale"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lock_image=true", "model.lock_image_unlocked_groups=-1"], "model.lock_image_unlocked_groups: must be >= 0"),
        (["model.lock_text_unlocked_layers=1"], "model.lock_text_unlocked_layers: only applies to a locked tower"),
    ],
)  # fmt: skip
def test_bad_lock_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)


def test_lock_that_freezes_nothing_exits_2_before_writing(tmp_path, capsys):
    """10 groups unlock all of tiny-clip's image tower: one line, exit 2, no run directory."""
    args = ["--config", str(TINY), f"run.dir={tmp_path}", "model.lock_image=true"]
    line = refused(["train", *args, "model.lock_image_unlocked_groups=10"], capsys, tmp_path / "tiny")
    assert line == (
        "pretrain: error: model.lock_image_unlocked_groups: 10 unlocks every layer group of the image tower; "
        "lock fewer"
    )
