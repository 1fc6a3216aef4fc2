"""Optimizer choice (`train.optimizer`), per-tower rates and layer-wise rate decay: each parameter's rate
against timm's `param_groups_layer_decay` on the same tower, each group's rate at every step against
open_clip_train's scheduler, timm optimizers against timm's own classes, and exact resume."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import TINY, one_torch_thread, read_jsonl, refused, train_in_process, train_runs
from open_clip import CLIP
from open_clip_train.scheduler import cosine_lr
from safetensors.torch import load_file
from timm.optim import Adafactor, Lamb, Lion, param_groups_layer_decay
from torch import nn

from pretrain.config import ConfigError, ModelConfig, TrainConfig, load_config
from pretrain.models.build import build_model, load_trained
from pretrain.parallel.deepspeed import check_deepspeed_optimizer
from pretrain.training.optim import build_optimizer, build_scheduler
from pretrain.training.param_groups import param_groups
from pretrain.training.trainer import Trainer

LR, IMAGE_LR, TEXT_LR, IMAGE_DECAY, TEXT_DECAY = 1e-3, 3e-4, 2.5e-4, 0.5, 0.75
DECAYED = TrainConfig(
    lr=LR, image_lr=IMAGE_LR, text_lr=TEXT_LR, image_layer_decay=IMAGE_DECAY, text_layer_decay=TEXT_DECAY,
    steps=12, warmup_steps=3,
)  # fmt: skip
STEMS = {  # EVA-CLIP's layer 0 in open_clip's names; timm numbers the rest
    "image": ("conv1", "class_embedding", "positional_embedding", "ln_pre"),
    "text": ("token_embedding", "positional_embedding", "cls_emb"),
}
CLIP_TEXT = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


class TimmView(nn.Module):
    """The parts of one tower (the very parameters, not copies) with a timm ViT-style `group_matcher`, so
    timm's `param_groups_layer_decay` numbers its layers: stem 0, `transformer.resblocks.i` i + 1, the rest
    (final norm, pooler, projection) last."""

    def __init__(self, parts: dict, stem: tuple[str, ...]) -> None:
        super().__init__()
        for name, part in parts.items():
            setattr(self, name, part)
        self.stem = stem

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": rf"^(?:{'|'.join(self.stem)})", "blocks": r"^transformer\.resblocks\.(\d+)"}


def tower_views(model: nn.Module) -> dict[str, TimmView]:
    def parts(module: nn.Module) -> dict:
        return {**dict(module.named_children()), **dict(module.named_parameters(recurse=False))}

    text = parts(model.text) if hasattr(model, "text") else {n: getattr(model, n) for n in CLIP_TEXT}
    return {"image": TimmView(parts(model.visual), STEMS["image"]), "text": TimmView(text, STEMS["text"])}


def expected_base_lrs(model: nn.Module) -> dict[int, float]:
    """id(parameter) -> DECAYED's base rate: the tower's rate x timm's lr_scale; `train.lr` outside the towers."""
    base = {id(p): LR for p in model.parameters()}
    for tower, view in tower_views(model).items():
        decay, lr = (IMAGE_DECAY, IMAGE_LR) if tower == "image" else (TEXT_DECAY, TEXT_LR)
        for group in param_groups_layer_decay(view, weight_decay=0.2, layer_decay=decay):
            base.update({id(p): lr * group["lr_scale"] for p in group["params"]})
    return base


@pytest.fixture(scope="module", params=["tiny-clip", "tiny-siglip", "tiny-coca"])
def model(request) -> nn.Module:
    with one_torch_thread():
        return build_model(ModelConfig(name=request.param)).model


def test_each_parameter_gets_its_towers_rate_scaled_as_timm_numbers_its_layer(model):
    expected, seen = expected_base_lrs(model), set()
    for group in param_groups(model, DECAYED):
        for p in group["params"]:
            assert group["lr"] == pytest.approx(expected[id(p)], rel=1e-12)
            assert group["weight_decay"] == (0.0 if p.ndim < 2 else DECAYED.weight_decay)
            seen.add(id(p))
    assert seen == {id(p) for p in model.parameters()}
    assert len({round(r, 12) for r in expected.values()}) == 1 + 4 + 4  # lr; 4 layers of each tower (N=2)


def test_default_groups_are_open_clips_two(model):
    """No tower rate, no decay: open_clip_train's AdamW groups (main.py's exclude rule), all at `train.lr`."""
    named = list(model.named_parameters())
    exclude = [
        p for n, p in named if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    ]
    rest = [p for n, p in named if not any(p is q for q in exclude)]
    groups = param_groups(model, TrainConfig(lr=LR))
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in exclude], [id(p) for p in rest]]
    assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.0, LR), (0.2, LR)]


def test_wd_exclude_patterns_join_the_undecayed_group(model):
    """open_clip_train's --wd-exclude: fnmatch over full parameter names, on top of the default rule."""
    patterns = ["*positional_embedding", "visual.proj"]
    named = list(model.named_parameters())
    exclude = [
        p for n, p in named
        if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        or n.endswith("positional_embedding") or n == "visual.proj"
    ]  # fmt: skip
    assert len(exclude) > len(param_groups(model, TrainConfig(lr=LR))[0]["params"]) + 2
    groups = param_groups(model, TrainConfig(lr=LR, wd_exclude=patterns))
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in exclude]
    assert groups[0]["weight_decay"] == 0.0


def test_each_group_follows_warmup_and_cosine_from_its_own_rate(model):
    expected = expected_base_lrs(model)
    optimizer = build_optimizer(model, DECAYED)
    scheduler = build_scheduler(optimizer, DECAYED)
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)  # open_clip's factor of rate 1
    factor = cosine_lr(reference, 1.0, DECAYED.warmup_steps, DECAYED.steps)
    for step in range(DECAYED.steps):
        for group in optimizer.param_groups:
            want = expected[id(group["params"][0])] * factor(step)
            assert group["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18), step
        optimizer.step()
        scheduler.step()
    assert expected[id(optimizer.param_groups[0]["params"][0])] == LR  # metrics' `lr` (group 0) is train.lr's


@pytest.mark.parametrize(
    ("name", "timm_class", "kwargs"),
    [
        ("timm/lion", Lion, {"betas": [0.9, 0.99]}),
        ("timm/lamb", Lamb, {}),
        ("timm/adafactor", Adafactor, {}),
    ],
)
def test_timm_optimizer_steps_as_timms_own_on_the_same_groups(model, name, timm_class, kwargs):
    """Three steps of warmup and cosine with the same gradients: our optimizer + schedule against timm's class
    built here on a copy, its rates set by hand from the reference rates and open_clip's schedule."""
    cfg = dataclasses.replace(DECAYED, optimizer=name, optimizer_kwargs=kwargs, steps=4, warmup_steps=2)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    twin = dict(zip(map(id, ours.parameters()), theirs.parameters(), strict=True))
    expected = expected_base_lrs(ours)
    optimizer = build_optimizer(ours, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    groups = [
        {"params": [twin[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"], "base": expected[id(g["params"][0])]}
        for g in optimizer.param_groups
    ]  # fmt: skip
    options = {k: tuple(v) for k, v in kwargs.items()}
    reference = timm_class(groups, lr=LR, weight_decay=cfg.weight_decay, **options)
    factor = cosine_lr(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 1.0, 2, 4)
    gen = torch.Generator().manual_seed(0)
    with one_torch_thread():
        for step in range(3):
            for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
            for group in reference.param_groups:
                group["lr"] = group["base"] * factor(step)
            optimizer.step()
            scheduler.step()
            reference.step()
    assert type(optimizer) is timm_class
    moved = 0
    for (n, p), q, start in zip(
        ours.named_parameters(), theirs.parameters(), model.parameters(), strict=True
    ):
        assert torch.equal(p, q), n
        moved += not torch.equal(p, start)
    assert moved == len(twin)  # every parameter stepped, at its own rate


def assert_same_run(a, b, steps: int) -> None:
    """Same metrics (losses, rates) at every step and bitwise the same final weights (test_resume's check)."""
    keys = ("step", "samples_seen", "loss", "lr", "logit_scale")
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [{k: r.get(k) for k in keys} for r in ma] == [{k: r.get(k) for k in keys} for r in mb]
    assert [r["step"] for r in ma if "loss" in r] == list(range(1, steps + 1))
    final = f"checkpoints/step_{steps:08d}/model.safetensors"
    pa, pb = load_file(a / final), load_file(b / final)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


LAYER_DECAY = ["train.image_layer_decay=0.6", "train.text_layer_decay=0.8", "train.text_lr=5e-4"]


@pytest.mark.parametrize("optimizer", ["timm/lion"])
def test_resume_with_a_timm_optimizer_and_layer_decay_equals_uninterrupted(tmp_path, optimizer):
    overrides = ["train.steps=8", "checkpoint.every=3", f"train.optimizer={optimizer}", *LAYER_DECAY]
    with one_torch_thread():
        straight = train_in_process(tmp_path, name="straight", overrides=overrides)
        train_in_process(tmp_path, name="resumed", overrides=overrides, until=5)
        resumed = train_in_process(tmp_path, name="resumed", overrides=[*overrides, "resume=latest"])
    assert_same_run(straight, resumed, steps=8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.optimizer=lion"],
            "train.optimizer: unknown 'lion' (did you mean 'timm/lion'?); choices: adamw",
        ),
        (["train.optimizer=timm/nope"], "train.optimizer: unknown 'timm/nope'"),
        (["train.optimizer_kwargs.eps=1e-8"], "train.optimizer_kwargs: only for train.optimizer=timm/NAME"),
        (["train.image_layer_decay=0"], "train.image_layer_decay: must be in (0, 1]"),
        (["train.text_layer_decay=1.5"], "train.text_layer_decay: must be in (0, 1]"),
        (["train.image_lr=0"], "train.image_lr: must be > 0"),
    ],
)
def test_bad_optimizer_keys_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_timm_image_tower_is_numbered_by_timms_own_layer_decay():
    """A timm trunk under open_clip's projection head: each trunk parameter at timm's own lr_scale one layer
    further down (open_clip's head is the layer above the trunk, as in open_clip's TimmModel.layer_groups),
    the head at the image rate."""
    vision = {
        "timm_model_name": "vit_tiny_patch16_224",
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 32,
    }
    text = {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1}
    with one_torch_thread():
        model = CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text)
    cfg = TrainConfig(lr=LR, image_lr=IMAGE_LR, image_layer_decay=IMAGE_DECAY)
    timm_groups = param_groups_layer_decay(model.visual.trunk, weight_decay=0.2, layer_decay=IMAGE_DECAY)
    expected = {id(p): IMAGE_LR * g["lr_scale"] * IMAGE_DECAY for g in timm_groups for p in g["params"]}
    expected |= {id(p): IMAGE_LR for p in model.visual.head.parameters()}
    ours = {id(p): g["lr"] for g in param_groups(model, cfg) for p in g["params"]}
    assert {k: ours[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    assert len(expected) == len(list(model.visual.parameters())) and len(set(expected.values())) == 14


def test_a_tower_without_numbered_layers_refuses_layer_decay_in_one_line(model):
    other = copy.deepcopy(model)
    other.visual = nn.Linear(2, 2)  # as a timm or Hugging Face tower: no open_clip blocks to number
    with pytest.raises(ConfigError, match=r"^train\.image_layer_decay: this image tower \(Linear\)"):
        param_groups(other, TrainConfig(image_layer_decay=0.9))
    assert len(param_groups(other, TrainConfig(image_lr=1e-4))) == 4  # its own rate needs no layers


def test_deepspeed_refuses_an_optimizer_that_reads_whole_tensors():
    check_deepspeed_optimizer(TrainConfig())
    check_deepspeed_optimizer(TrainConfig(optimizer="timm/lion"))
    with pytest.raises(ConfigError, match=r"^train\.optimizer: timm/lamb reads whole tensors") as err:
        check_deepspeed_optimizer(TrainConfig(optimizer="timm/lamb"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^train\.optimizer_kwargs: caution reads whole tensors"):
        check_deepspeed_optimizer(TrainConfig(optimizer="timm/lion", optimizer_kwargs={"caution": True}))


def test_locked_parameters_stay_out_of_every_group(model):
    locked = copy.deepcopy(model)
    locked.visual.requires_grad_(False)
    groups = param_groups(locked, DECAYED)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in locked.parameters() if p.requires_grad} and grouped


RUNS = {  # name: (reference run, overrides)
    "ddp": (None, ["dist.strategy=ddp", "train.optimizer=timm/lion"]),
    "fsdp": ("ddp", ["dist.strategy=fsdp", "train.optimizer=timm/lion"]),
    "deepspeed2": ("ddp", ["dist.strategy=deepspeed", "dist.zero_stage=2", "train.optimizer=timm/lion"]),
    "deepspeed3": ("ddp", ["dist.strategy=deepspeed", "dist.zero_stage=3", "train.optimizer=timm/lion"]),
    "ddp-lamb": (None, ["dist.strategy=ddp", "train.optimizer=timm/lamb"]),
    "fsdp-lamb": ("ddp-lamb", ["dist.strategy=fsdp", "train.optimizer=timm/lamb"]),
}


@pytest.mark.slow
def test_strategies_agree_with_a_timm_optimizer_and_layer_decay(tmp_path):
    """2 gloo ranks, one torchrun: FSDP2 (DTensor parameters: LAMB's per-tensor norms over shards) and
    DeepSpeed ZeRO-2/3 (flat partitions, the client optimizer) step timm's optimizers on the decayed groups
    as DDP does: the same losses, and the same weights but where Lion takes the sign of float noise (the key
    bias of attention has no true gradient; measured: FSDP and ZeRO-2 0 elements apart, ZeRO-3 ~420 of 7.2M,
    FSDP LAMB 2 by 7e-6)."""
    base = ["train.steps=4", "train.batch_size=8", *LAYER_DECAY]
    plan = [
        {"train": [f"run.dir={tmp_path}", f"run.name={name}", "log.every=1", *base, *extra]}
        for name, (_, extra) in RUNS.items()
    ]
    train_runs(plan, env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")})
    for name, (reference, _) in RUNS.items():
        if reference is None:
            continue
        ours, theirs = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in (name, reference))
        assert [r["loss"] for r in ours if "loss" in r] == pytest.approx(
            [r["loss"] for r in theirs if "loss" in r], rel=1e-4
        ), name
        wa = load_trained(tmp_path / reference).model.state_dict()
        wb = load_trained(tmp_path / name).model.state_dict()
        apart = sum(((wa[k] - wb[k]).abs() > 1e-5).sum().item() for k in wa)
        assert apart < 2e-4 * sum(v.numel() for v in wa.values()), name


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ("train.optimizer=timm/lion", "was saved with train.optimizer=adamw, this run has timm/lion"),
        ("train.image_layer_decay=0.9", "was saved with train.image_layer_decay=1.0, this run has 0.9"),
    ],
)
def test_resuming_with_another_optimizer_or_group_split_is_one_line(tmp_path, capsys, changed, message):
    run_dir = train_in_process(tmp_path, name="saved", overrides=["train.steps=1"])
    args = ["--config", str(TINY), f"run.dir={tmp_path}", "run.name=saved", "resume=latest", changed]
    line = refused(["train", *args], capsys)
    assert line.startswith(f"pretrain: error: {run_dir}/checkpoints/step_00000001 {message}: the optimizer")


def test_a_resumed_run_uses_its_own_tower_rate(tmp_path):
    """Same group split, another `train.image_lr`: from the first resumed step on, the image groups follow the
    new rate (StepSchedule keeps this run's base rates, not the checkpoint's)."""
    base = ["train.steps=6", "train.warmup_steps=2", "checkpoint.every=3"]
    train_in_process(tmp_path, name="run", overrides=[*base, "train.image_lr=1e-4"], until=3)
    cfg = load_config(
        TINY, [f"run.dir={tmp_path}", "run.name=run", *base, "train.image_lr=3e-4", "resume=latest"]
    )
    trainer = Trainer(cfg)
    try:
        factor = cosine_lr(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 1.0, 2, 6)(3)
        rates = [g["lr"] for g in trainer.optimizer.param_groups]
        assert rates == pytest.approx([1e-3 * factor] * 2 + [3e-4 * factor] * 2, rel=1e-12)
    finally:
        trainer.close()
