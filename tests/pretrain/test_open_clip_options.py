"""open_clip_train's model and DDP options under our keys, against open_clip and torch: `model.force_*` and
`model.image_*` build what open_clip's create_model_and_transforms builds with the same arguments (and
checkpoints and exports keep it), `dist.sync_bn` turns
every BatchNorm of open_clip's ResNet tower into SyncBatchNorm, `dist.static_graph` reaches DDP, and both are
refused, naming the key, where they cannot apply."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import cli_output, read_jsonl, torchrun, train_in_process, train_runs
from PIL import Image

from pretrain.config import ConfigError, ModelConfig, load_config
from pretrain.models.build import build_model, load_trained, register_model_configs
from pretrain.parallel.ddp import apply_sync_bn

# A ResNet image tower (open_clip's ModifiedResNet, with BatchNorm) small enough for CPU.
TINY_RESNET = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FORCED = [
    {"force_quick_gelu": True},
    {"force_custom_text": True},
    {"force_image_size": 96},
    {"force_context_length": 16},
    {"force_quick_gelu": True, "force_custom_text": True, "force_image_size": 32},
    {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2], "image_interpolation": "bilinear"},
    {"image_resize_mode": "longest", "image_interpolation": "random"},
]


def signature(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Every module's name and type, and each activation's class: what an architecture override changes."""
    return [(name, type(module).__name__) for name, module in model.named_modules()]


def shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def image_shape(preprocess) -> tuple:
    return tuple(preprocess(Image.new("RGB", (200, 150))).shape)


@pytest.mark.parametrize("forced", FORCED, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_force_keys_build_what_open_clip_builds(forced):
    register_model_configs()
    ours = build_model(ModelConfig(name="tiny-clip", **forced))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in forced.items()}
    ref, ref_train, ref_val = open_clip.create_model_and_transforms("tiny-clip", **kwargs)
    assert signature(ours.model) == signature(ref)
    assert type(ours.model) is type(ref) and ours.model.visual.image_size == ref.visual.image_size
    assert ours.model.visual.preprocess_cfg == ref.visual.preprocess_cfg
    assert repr(ours.preprocess_train) == repr(ref_train) and repr(ours.preprocess_val) == repr(ref_val)
    assert image_shape(ours.preprocess_train) == image_shape(ref_train)
    assert image_shape(ours.preprocess_val) == image_shape(ref_val)
    context = forced.get("force_context_length")
    reference_tokens = open_clip.get_tokenizer("tiny-clip", context_length=context)(["a red circle"])
    assert torch.equal(ours.tokenizer(["a red circle"]), reference_tokens)
    assert shapes(ours.model) == shapes(ref)
    gelu = {type(m).__name__ for m in ours.model.modules() if "GELU" in type(m).__name__}
    assert gelu == ({"QuickGELU"} if forced.get("force_quick_gelu") else {"GELU"})
    # the config an export (and `pretrain adapt`'s merged LoRA model) writes builds the same architecture
    cfg = dict(ours.model_cfg)
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    assert signature(cls(**cfg)) == signature(ref)


def test_force_keys_survive_checkpoint_and_export(tmp_path, capsys):
    """A model trained with the overrides is rebuilt from its checkpoint and from its export (open_clip's
    `local-dir:`) with the same architecture and embeddings."""
    forced = ["model.force_quick_gelu=true", "model.force_custom_text=true", "model.force_image_size=48",
              "model.force_context_length=16", "model.image_mean=[0.5, 0.4, 0.3]", "model.image_std=[0.2, 0.3, 0.4]"]  # fmt: skip
    run = train_in_process(tmp_path, ["train.steps=1", "train.batch_size=4", *forced], name="r")
    out = tmp_path / "export"
    cli_output(["export", "--checkpoint", str(run), "--output", str(out)], capsys)
    exported, _, exported_val = open_clip.create_model_and_transforms(f"local-dir:{out}")
    ours = load_trained(run)
    reference, _, reference_val = open_clip.create_model_and_transforms(
        "tiny-clip", force_quick_gelu=True, force_custom_text=True, force_image_size=48, force_context_length=16,
        image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.4),
    )  # fmt: skip
    assert signature(ours.model) == signature(exported) == signature(reference)
    image = Image.effect_mandelbrot((90, 70), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    pixels = [preprocess(image) for preprocess in (ours.preprocess_val, exported_val, reference_val)]
    assert (
        pixels[0].shape == (3, 48, 48)
        and torch.equal(pixels[0], pixels[1])
        and torch.equal(pixels[0], pixels[2])
    )
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(["a red circle"])
    assert torch.equal(tokens, ours.tokenizer(["a red circle"])) and tokens.shape == (1, 16)
    ours = ours.model
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval().encode_image(images), ours.eval().encode_image(images))


def test_pretrained_image_asks_timm_for_its_weights_as_open_clip_does(tmp_path, monkeypatch):
    """`model.pretrained_image` reaches timm as open_clip's `pretrained_image` does (timm's download itself
    is replaced by a record of what was asked), and weights given in `model.pretrained` skip it."""
    import timm

    config = tmp_path / "tiny-timm.json"
    config.write_text(
        json.dumps({**TINY_RESNET, "vision_cfg": {"timm_model_name": "resnet10t", "image_size": 32}})
    )
    asked, create = [], timm.create_model
    monkeypatch.setattr(
        timm, "create_model", lambda *a, pretrained=False, **k: asked.append(pretrained) or create(*a, **k)
    )
    build_model(ModelConfig(name=str(config), pretrained_image=True))
    open_clip.create_model("tiny-timm", pretrained_image=True)
    build_model(ModelConfig(name=str(config)))
    assert asked == [True, True, False]
    weights = tmp_path / "weights.pt"
    torch.save(open_clip.create_model("tiny-timm").state_dict(), weights)
    build_model(ModelConfig(name=str(config), pretrained=str(weights), pretrained_image=True))
    assert asked[-1] is False


def tiny_resnet(tmp_path: Path) -> Path:
    config = tmp_path / "tiny-resnet.json"
    config.write_text(json.dumps(TINY_RESNET))
    open_clip.add_model_config(config)
    return config


def test_sync_bn_converts_every_batchnorm_of_open_clips_resnet(tmp_path):
    """What `dist.sync_bn` does to the model before DDP wraps it (the conversion itself needs no GPU): every
    BatchNorm of open_clip's ResNet tower becomes a SyncBatchNorm with the same weights and state-dict keys,
    so it computes the same in eval and its checkpoints load into open_clip's plain model."""
    tiny_resnet(tmp_path)
    reference = open_clip.create_model("tiny-resnet").eval()
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    assert batchnorms > 0
    synced = apply_sync_bn(copy.deepcopy(reference), torch.device("cuda", 0)).eval()
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == batchnorms
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    reference.load_state_dict(synced.state_dict())  # strict: the same keys
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(synced.encode_image(images), reference.encode_image(images))


def test_static_graph_reaches_ddp_and_sync_bn_on_cpu_is_refused(tmp_path):
    """On 2 gloo ranks: DDP gets static_graph=True; a model without BatchNorm is left as it is (one log line);
    one with BatchNorm is refused on CPU in one line naming the key (torch's DDP would fail on it)."""
    config = tiny_resnet(tmp_path)
    out = tmp_path / "result.json"
    proc = torchrun(2, [str(Path(__file__).with_name("ddp_options_worker.py")), str(config), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result[str(config)] == {
        "refused": "dist.sync_bn: torch's DDP takes SyncBatchNorm on GPUs only, this run is on cpu"
    }
    assert result["tiny-clip"] == {
        "sync": 0,
        "plain": 0,
        "static_graph": True,
        "log": ["dist.sync_bn: the model has no BatchNorm layer; nothing to sync"],
    }


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["dist.sync_bn=true", "dist.strategy=fsdp"], "dist.sync_bn"),
        (["dist.sync_bn=true", "dist.strategy=deepspeed"], "dist.sync_bn"),
        (["dist.static_graph=true", "dist.strategy=fsdp"], "dist.static_graph"),
        (["dist.static_graph=true", "dist.strategy=deepspeed"], "dist.static_graph"),
        (["dist.static_graph=true", "train.accum_steps=2"], "dist.static_graph"),
        (["data.train_upsampling_factors=[1, 2]"], "data.train_upsampling_factors"),
        (
            ["data.train_upsampling_factors=[1]", "data.train_weights=[1]", "data.sampling=resampled"],
            "data.train_upsampling_factors",
        ),
        (["data.train_upsampling_factors=[-1]", "data.sampling=resampled"], "data.train_upsampling_factors"),
        (["model.force_image_size=0"], "model.force_image_size"),
        (["model.force_context_length=0"], "model.force_context_length"),
        (["model.image_mean=[0.5, 0.5]"], "model.image_mean"),
        (["model.image_std=[0.0]"], "model.image_std"),
        (["model.image_interpolation=nearest"], "model.image_interpolation"),
        (["model.image_resize_mode=crop"], "model.image_resize_mode"),
        (["model.force_image_size=[32, 48]"], "model.force_image_size"),
    ],
)
def test_refusals_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(None, overrides)


@pytest.mark.slow  # ~25 s on 2 busy cores: two 2-rank runs
def test_static_graph_trains_like_the_default_graph(tmp_path):
    """2 gloo ranks: the same losses and weights with DDP's static graph as without."""
    runs = {name: tmp_path / name for name in ("static", "default")}
    args = ["train.steps=3", "train.batch_size=4", "log.every=1"]
    train_runs(
        [
            {
                "train": [
                    f"run.dir={tmp_path}",
                    f"run.name={name}",
                    *args,
                    f"dist.static_graph={name == 'static'}",
                ]
            }
            for name in runs
        ]
    )
    static, default = (read_jsonl(run / "metrics.jsonl") for run in runs.values())
    assert [r["loss"] for r in static if "loss" in r] == [r["loss"] for r in default if "loss" in r]
    weights = [load_trained(run).model.state_dict() for run in runs.values()]
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=0, atol=0)


def test_a_run_with_upsampling_factors_weighs_sources_by_factor_times_shards(tmp_path, demo_data):
    """`data.train_upsampling_factors=[1, 3]` over sources of 1 and 3 shards trains, and the data card records
    the weights the sampler used: factor x shard count (open_clip's per-shard factors)."""
    train = f"{demo_data}/train/00000.tar::{demo_data}/train/{{00001..00003}}.tar"
    overrides = [f"data.train={train}", "data.sampling=resampled", "data.train_upsampling_factors=[1, 3]"]
    run = train_in_process(tmp_path, ["train.steps=1", "train.batch_size=4", *overrides], name="r")
    card = json.loads((run / "data_card.json").read_text())
    assert [source["weight"] for source in card["sources"]] == [1.0, 9.0]
