"""The fast-step options on CPU: train.compile (and its dist.compile alias), train.fused_adamw, SDPA attention
in both towers, patch dropout (train only, not exported), and the device prefetcher's exact resume."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import open_clip
import pytest
import torch
from helpers import TINY, read_jsonl, train_in_process
from safetensors.torch import load_file

import pretrain.training.trainer
from pretrain.config import ConfigError, ModelConfig, TrainConfig, load_config
from pretrain.data.prefetch import DevicePrefetcher
from pretrain.data.synthetic import SyntheticSource
from pretrain.models.build import build_model, register_model_configs, use_dict_outputs
from pretrain.training.fast import adamw_kind, build_adamw
from pretrain.training.trainer import Trainer

COMPARED = ("step", "samples_seen", "loss", "lr", "logit_scale", "data_skipped")

# ---- config keys ------------------------------------------------------------------------------------------


def test_dist_compile_is_a_deprecated_alias_of_train_compile(caplog):
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        cfg = load_config(TINY, ["dist.compile=true"])
    assert cfg.train.compile is True and cfg.dist.compile is None
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "dist.compile is deprecated: use train.compile (set to True)"
    ]
    assert load_config(TINY, ["train.compile=true"]).train.compile is True
    assert load_config(TINY).train.compile is False


@pytest.mark.parametrize("value, expected", [("true", "true"), ("false", "false"), ("auto", "auto")])
def test_fused_adamw_values(value, expected):
    assert load_config(TINY, [f"train.fused_adamw={value}"]).train.fused_adamw == expected


def test_bad_fused_adamw_and_patch_dropout_name_the_key():
    with pytest.raises(
        ConfigError, match=r"^train.fused_adamw: must be auto, true or false, got 'sometimes'"
    ):
        load_config(TINY, ["train.fused_adamw=sometimes"])
    with pytest.raises(ConfigError, match=r"^model.patch_dropout: must be in \[0, 1\), got 1.0"):
        load_config(TINY, ["model.patch_dropout=1.0"])


# ---- fused AdamW ------------------------------------------------------------------------------------------


def _param(device: str) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device), requires_grad=True)


def test_adamw_kind_auto_is_fused_only_when_every_trainable_parameter_is_on_cuda():
    assert adamw_kind([_param("cuda"), _param("cuda")], "auto") == "fused"
    assert adamw_kind([_param("cuda"), _param("cpu")], "auto") == "default"
    frozen_cpu = SimpleNamespace(device=torch.device("cpu"), requires_grad=False)
    assert adamw_kind([_param("cuda"), frozen_cpu], "auto") == "fused"
    assert adamw_kind([_param("cpu")], "auto") == "default"
    assert adamw_kind([_param("cpu")], "true") == "fused"
    assert adamw_kind([_param("cuda")], "false") == "default"


def test_build_adamw_on_cpu_by_mode(caplog):
    groups = lambda: [{"params": [torch.nn.Parameter(torch.ones(3))], "weight_decay": 0.0}]  # noqa: E731
    with caplog.at_level(logging.INFO, logger="pretrain"):
        auto = build_adamw(groups(), TrainConfig())
    assert not auto.defaults["fused"] and "AdamW (default, train.fused_adamw=auto)" in caplog.text
    fused = build_adamw(groups(), TrainConfig(fused_adamw="true"))  # torch has a CPU fused kernel
    assert fused.defaults["fused"] is True


def test_fused_adamw_true_where_torch_refuses_is_a_config_error():
    meta = [{"params": [torch.nn.Parameter(torch.ones(3, device="meta"))], "weight_decay": 0.0}]
    with pytest.raises(ConfigError, match=r"^train.fused_adamw: true, but torch has no fused AdamW here: "):
        build_adamw(meta, TrainConfig(fused_adamw="true"))


# ---- compile ----------------------------------------------------------------------------------------------


def _losses(tmp_path, name: str, overrides: list[str], steps: int = 2) -> tuple[list[float], Trainer]:
    cfg = load_config(TINY, [f"run.dir={tmp_path}", f"run.name={name}", "train.batch_size=8", *overrides])
    trainer = Trainer(cfg)
    try:
        return [trainer.train_step().item() for _ in range(steps)], trainer
    finally:
        trainer.close()


@pytest.mark.slow
def test_compiled_step_equals_eager_step(tmp_path):
    eager, _ = _losses(tmp_path, "eager", [])
    compiled, trainer = _losses(tmp_path, "compiled", ["train.compile=true"])
    assert trainer.strategy.compile_blocks
    assert all(getattr(b, "_compiled_call_impl", None) for b in trainer.model.visual.transformer.resblocks)
    assert "_TorchDynamoContext" in type(trainer.objective.contrastive).__name__ or hasattr(
        trainer.objective.contrastive, "_torchdynamo_orig_callable"
    )
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


# ---- SDPA and patch dropout --------------------------------------------------------------------------------


def _tiny(patch_dropout: float = 0.0) -> torch.nn.Module:
    model = build_model(ModelConfig(name="tiny-clip", patch_dropout=patch_dropout)).model
    use_dict_outputs(model)
    return model


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 64, 64), torch.randint(1, 1000, (n, 32))


def test_training_forward_runs_attention_through_sdpa_in_both_towers():
    model = _tiny().train()
    register_model_configs()
    config = open_clip.get_model_config("tiny-clip")
    layers = config["vision_cfg"]["layers"] + config["text_cfg"]["layers"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(*_batch())["image_features"].sum().backward()
    calls = [e for e in prof.events() if e.name == "aten::scaled_dot_product_attention"]
    assert len(calls) == layers


def _visual_tokens(model: torch.nn.Module) -> int:
    seen = []
    handle = model.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        model(*_batch())
    finally:
        handle.remove()
    return seen[0]


def test_patch_dropout_drops_tokens_in_training_only():
    register_model_configs()
    vision = open_clip.get_model_config("tiny-clip")["vision_cfg"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2  # 64 patches + the class token
    model = _tiny(patch_dropout=0.5)
    assert _visual_tokens(model.train()) == 1 + patches // 2
    with torch.no_grad():
        assert _visual_tokens(model.eval()) == 1 + patches
    assert _visual_tokens(_tiny().train()) == 1 + patches


def test_exported_model_has_no_patch_dropout(tmp_path):
    from pretrain.publish.export import export

    run = train_in_process(tmp_path, ["train.steps=1", "model.patch_dropout=0.5"])
    folder = export(run, tmp_path / "export")
    vision = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    assert vision.get("patch_dropout", 0.0) == 0.0
    loaded = open_clip.create_model("local-dir:" + str(folder), output_dict=True)
    assert _visual_tokens(loaded.train()) == 1 + (vision["image_size"] // vision["patch_size"]) ** 2


# ---- the device prefetcher ---------------------------------------------------------------------------------


def _source() -> SyntheticSource:
    return SyntheticSource(seed=3, batch_size=2, rank=0, world=1, image_size=8, context_length=6)


@pytest.mark.parametrize("ahead", [False, True])
def test_prefetcher_gives_the_source_batches_and_state_of_what_it_handed_out(ahead):
    plain, prefetched = _source(), DevicePrefetcher(_source(), torch.device("cpu"), ahead=ahead)
    for handed_out in range(1, 4):
        got, want = prefetched.next_batch(), plain.next_batch()
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert prefetched.state_dict() == {"kind": "synthetic", "samples": 2 * handed_out}
    assert prefetched.source.micro_batches == (4 if ahead else 3)  # one held ahead
    resumed = DevicePrefetcher(_source(), torch.device("cpu"), ahead=ahead)
    resumed.load_state_dict(prefetched.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), plain.next_batch(), strict=True))


def test_prefetcher_on_cpu_is_a_pass_through():
    prefetcher = DevicePrefetcher(_source(), torch.device("cpu"))
    assert not prefetcher.ahead and prefetcher.stream is None
    prefetcher.next_batch()
    assert prefetcher.source.micro_batches == 1


def assert_same_run(a, b, steps: int) -> None:
    """Same metrics lines (as tests/pretrain/test_resume.py compares them) and the same final weights."""
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [{k: r.get(k) for k in COMPARED} for r in ma] == [{k: r.get(k) for k in COMPARED} for r in mb]
    assert [r["step"] for r in ma if "loss" in r] == list(range(1, steps + 1))
    final = f"checkpoints/step_{steps:08d}/model.safetensors"
    pa, pb = load_file(a / final), load_file(b / final)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


class _AheadPrefetcher(DevicePrefetcher):
    def __init__(self, source, device) -> None:
        super().__init__(source, device, ahead=True)  # the CUDA lookahead, on CPU


@pytest.mark.slow
@pytest.mark.parametrize("data", ["synthetic", "shards"])
def test_resume_with_the_prefetcher_ahead_equals_uninterrupted(tmp_path, demo_data, data, monkeypatch):
    monkeypatch.setattr(pretrain.training.trainer, "DevicePrefetcher", _AheadPrefetcher)
    train = f"{demo_data}/train/{{00000..00003}}.tar" if data == "shards" else "synthetic"
    overrides = [f"data.train={train}", "train.steps=4", "checkpoint.every=2", "train.batch_size=8"]
    straight = train_in_process(tmp_path, name="straight", overrides=overrides)
    train_in_process(tmp_path, name="resumed", overrides=overrides, until=3)
    resumed = train_in_process(tmp_path, name="resumed", overrides=[*overrides, "resume=latest"])
    assert_same_run(straight, resumed, steps=4)
