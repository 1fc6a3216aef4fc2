"""`data.aug.*`: open_clip's augmentation settings (its `AugmentationCfg`) on the `cpu` and `device` loader paths.

The reference is open_clip's own training transform for the same settings, run on PIL images: the `cpu` path
must give exactly its tensors, and the device path must draw the same random parameters from the same seeds
(crop boxes, jitter factors, grayscale and erasing decisions) and give the same pixels up to resampling and
colour rounding, and the same distribution over many draws.
"""

from __future__ import annotations

import io
import logging
import random

import numpy as np
import open_clip
import pytest
import torch
from helpers import TINY
from PIL import Image
from timm.data import random_erasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from pretrain.config import AugConfig, ConfigError, load_config
from pretrain.data.decode import open_image, seeded, to_uint8
from pretrain.data.loader import DeviceFinish, WebDatasetSource
from pretrain.data.transform import TensorTransform
from pretrain.models.build import build_model
from webshards.layout import ShardWriter, key_for, write_sizes

# open_clip's own transform calls the jitter and grayscale settings it applies "unused" (see build.py)
pytestmark = pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")
SIZE = 64  # tiny-clip's input
SETTINGS = {
    "scale": {"scale": (0.3, 1.0)},
    "jitter": {"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8},
    "grayscale": {"gray_scale_prob": 0.5},
    "jitter+grayscale": {
        "color_jitter": (0.4, 0.4, 0.4, 0.1),
        "color_jitter_prob": 0.8,
        "gray_scale_prob": 0.2,
    },
    "timm": {"use_timm": True, "scale": (0.3, 1.0), "ratio": (0.5, 2.0)},
    "timm+jitter+erasing": {"use_timm": True, "color_jitter": (0.4, 0.4, 0.4), "re_prob": 0.5, "re_count": 2},
}


def overrides(settings: dict) -> list[str]:
    """`data.aug.*` overrides for open_clip `aug_cfg` settings."""
    return [
        f"data.aug.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "") for k, v in settings.items()
    ]


def coordinates(w: int, h: int, seed: int = 0) -> Image.Image:
    """An image whose red channel is x and green channel y (scaled to 0..255): a crop's box can be read off
    the output's value ranges. Blue: a constant 128 with faint texture, where erasing shows."""
    xs, ys = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    blue = np.full_like(xs, 128) + np.random.default_rng(seed).normal(0, 0.3, xs.shape)
    return Image.fromarray(np.stack([xs, ys, blue], -1).round().astype(np.uint8))


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def reference(settings: dict) -> T.Compose:
    """open_clip's training transform for tiny-clip's input with these settings."""
    return open_clip.image_transform(SIZE, is_train=True, aug_cfg=settings)


def pixels(normalised: torch.Tensor, transform: TensorTransform) -> torch.Tensor:
    """Normalised images back in 0..255."""
    mean, std = torch.tensor(transform.mean).view(3, 1, 1), torch.tensor(transform.std).view(3, 1, 1)
    return (normalised * std + mean) * 255


def is_gray(image: torch.Tensor) -> bool:
    return bool((image[0] - image[1]).abs().max() < 0.5 and (image[1] - image[2]).abs().max() < 0.5)


@pytest.fixture
def draws(monkeypatch) -> list:
    """Records the random parameters the steps draw: crop boxes, jitter order and factors, erasing noise."""
    seen = []

    def recording(cls, name: str, how=staticmethod):
        original = getattr(cls, name)

        def record(*args, **kwargs):
            result = original(*args, **kwargs)
            values = result if isinstance(result, tuple) else (result,)
            seen.append((name, *(v.tolist() if isinstance(v, torch.Tensor) else v for v in values)))
            return result

        monkeypatch.setattr(cls, name, how(record))

    recording(T.RandomResizedCrop, "get_params")
    recording(RandomResizedCropAndInterpolation, "get_params")
    recording(T.ColorJitter, "get_params")
    recording(random_erasing, "_get_pixels", how=lambda f: f)
    return seen


@pytest.mark.parametrize("name", list(SETTINGS))
def test_device_steps_draw_what_open_clips_transform_draws(name, draws):
    """Same seed: the same crop boxes, jitter factors, grayscale and erasing decisions, and the same pixels
    up to resampling and the colour kernels' rounding (torch's tensor kernels vs PIL's)."""
    transform = reference(SETTINGS[name])
    fast = TensorTransform.wrap(transform)
    assert fast is not None, transform
    for seed in range(12):
        image = coordinates(200 + 37 * seed, 150 + 23 * seed, seed)
        runs = []
        for run in (transform, fast):
            draws.clear()
            with seeded(seed, restore=False):
                out = run(image)
                after = (torch.rand(1).item(), random.random())  # both streams end at the same place
            runs.append((pixels(out, fast), list(draws), after))
        (expected, expected_draws, expected_after), (got, got_draws, got_after) = runs
        assert got_draws == expected_draws and got_after == expected_after
        assert is_gray(got) == is_gray(expected)
        diff = (got - expected).abs()
        assert diff.mean() < 2.0, (name, seed, diff.mean())  # pixel levels; a different crop: tens


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.concatenate([a, b])
    cdf = [np.searchsorted(np.sort(x), grid, side="right") / len(x) for x in (a, b)]
    return float(np.abs(cdf[0] - cdf[1]).max())


def outputs(settings: dict, seeds: range, device_path: bool) -> tuple[torch.Tensor, TensorTransform]:
    """The transform's outputs (0..255) for one coordinate image under each seed: open_clip's on PIL, or
    the device path's (`DeviceFinish`, here on the CPU) on the decoded uint8 tensor."""
    transform, image = reference(settings), coordinates(256, 192)
    fast = TensorTransform.wrap(transform)
    if device_path:
        batch = DeviceFinish(fast, torch.device("cpu"), encoded=False)(
            [to_uint8(image)] * len(seeds), list(seeds)
        )
    else:
        batch = []
        for seed in seeds:
            with seeded(seed, restore=True):
                batch.append(transform(image))
        batch = torch.stack(batch)
    return pixels(batch, fast), fast


N = 300
KS_CRITICAL = 1.95 * (2 / N) ** 0.5  # two-sample KS at alpha = 0.001


def shares_agree(a: float, b: float) -> bool:
    """Two shares of N draws each agree within 4 standard errors."""
    p = (a + b) / 2
    return abs(a - b) <= 4 * (2 * p * (1 - p) / N) ** 0.5 + 1e-9


def test_device_path_has_open_clips_distribution():
    """Over N draws with other seeds on each side: crop areas and aspect ratios, image brightness under
    jitter, and the shares of gray and of erased images agree with open_clip's transform on PIL images."""
    ours, theirs = range(N), range(N, 2 * N)

    def crops(images):
        width = images[:, 0].amax((1, 2)) - images[:, 0].amin((1, 2))
        height = images[:, 1].amax((1, 2)) - images[:, 1].amin((1, 2))
        return (width * height / 255**2).numpy(), np.log((width / height).numpy())

    a, b = (outputs(SETTINGS["timm"], s, device)[0] for s, device in ((ours, True), (theirs, False)))
    for stat_a, stat_b in zip(crops(a), crops(b)):
        assert ks_statistic(stat_a, stat_b) < KS_CRITICAL
    a, b = (outputs(SETTINGS["jitter+grayscale"], s, d)[0] for s, d in ((ours, True), (theirs, False)))
    assert ks_statistic(a.mean((1, 2, 3)).numpy(), b.mean((1, 2, 3)).numpy()) < KS_CRITICAL
    gray = [float(np.mean([is_gray(x) for x in images])) for images in (a, b)]
    assert 0.1 < gray[0] < 0.3 and shares_agree(*gray)
    settings = {"use_timm": True, "re_prob": 0.5}
    a, b = (outputs(settings, s, d)[0] for s, d in ((ours, True), (theirs, False)))
    erased = [((images[:, 2] - 128).abs().amax((1, 2)) > 8).float().mean().item() for images in (a, b)]
    assert 0.4 < erased[0] < 0.6 and shares_agree(*erased)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aug")
    with ShardWriter(folder, 0) as writer:
        for i in range(12):
            writer.add(
                key_for(0, i),
                jpeg(coordinates(300 + 37 * i, 200 + 23 * i, i)),
                f"image {i}",
                {"path": f"p{i}"},
            )
    write_sizes(folder)
    return folder / "00000.tar"


def training_batch(shard, settings: dict, decode: str) -> tuple[torch.Tensor, dict, object]:
    """A training batch of the shard through `WebDatasetSource`, with the model's transform built from
    `data.aug.*` as the trainer builds it."""
    cfg = load_config(TINY, [f"data.decode={decode}", *overrides(settings)])
    bundle = build_model(cfg.model, aug=cfg.data.aug.to_open_clip())
    source = WebDatasetSource(str(shard), cfg.data, "resampled", 0, 12, 0, 1, bundle, torch.device("cpu"))
    try:
        images, _, info = source.next_batch_with_info()
    finally:
        source.close()
    return images, info, bundle.preprocess_train


@pytest.mark.parametrize("name", ["jitter+grayscale", "timm+jitter+erasing"])
def test_cpu_path_is_open_clips_transform_exactly(shard, name):
    """`data.decode=cpu`: each sample is open_clip's transform for the settings, seeded with the sample's
    seed, on the decoded image: the same tensor to the bit."""
    images, info, _ = training_batch(shard, SETTINGS[name], "cpu")
    transform = reference(SETTINGS[name])
    for image, key, seed in zip(images, info["keys"], info["seeds"]):
        i = int(key[-4:])
        raw = {"jpg": jpeg(coordinates(300 + 37 * i, 200 + 23 * i, i))}
        with seeded(seed, restore=True):
            expected = transform(open_image(raw, SIZE))
        assert torch.equal(image, expected), key


@pytest.mark.parametrize("name", ["jitter+grayscale", "timm+jitter+erasing"])
def test_device_path_matches_the_cpu_path(shard, name):
    (cpu, cpu_info, transform), (device, device_info, _) = (
        training_batch(shard, SETTINGS[name], d) for d in ("cpu", "device")
    )
    assert cpu_info["keys"] == device_info["keys"]
    fast = TensorTransform.wrap(transform)
    for a, b in zip(pixels(cpu, fast), pixels(device, fast)):
        assert is_gray(a) == is_gray(b)
        assert (a - b).abs().mean() < 2.0  # pixel levels


def steps(transform: T.Compose) -> list:
    """Each step's type and settings (open_clip's jitter and grayscale wrappers have no repr of their own)."""
    return [
        (type(t).__name__, {k: repr(v) for k, v in vars(t).items() if not k.startswith("_")})
        for t in transform.transforms
    ]


def test_the_trainers_transform_is_open_clips_for_the_settings():
    for settings in [{}, *SETTINGS.values()]:
        cfg = load_config(TINY, overrides(settings))
        bundle = build_model(cfg.model, aug=cfg.data.aug.to_open_clip())
        expected = reference(open_clip.AugmentationCfg(**settings))  # tiny-clip: open_clip's preprocessing
        assert steps(bundle.preprocess_train) == steps(expected)


def test_aug_config_has_open_clips_fields_and_defaults():
    from dataclasses import asdict, fields

    assert [f.name for f in fields(AugConfig)] == [f.name for f in fields(open_clip.AugmentationCfg)]
    defaults = {k: v for k, v in asdict(open_clip.AugmentationCfg()).items() if v is not None}
    assert AugConfig().to_open_clip() == defaults


@pytest.mark.parametrize(
    "override, key",
    [("data.aug.scale=[0.5]", "data.aug.scale"), ("data.aug.scale=[0.8,0.5]", "data.aug.scale"),
     ("data.aug.ratio=[0.5,2.0]", "data.aug.ratio"),  # open_clip's own transform ignores it
     ("data.aug.color_jitter=[0.4,0.4,0.4,0.1]", "data.aug.color_jitter"),  # no probability: ignored
     ("data.aug.color_jitter_prob=0.8", "data.aug.color_jitter_prob"),
     ("data.aug.gray_scale_prob=1.5", "data.aug.gray_scale_prob"),
     ("data.aug.re_prob=0.5", "data.aug.re_prob"),
     ("data.aug.color_jitter=[0.4,0.4,0.4,0.9]", "data.aug.color_jitter"),
     ("data.aug.colour_jitter=0.4", "data.aug.colour_jitter")],
)  # fmt: skip
def test_bad_aug_settings_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    message = str(err.value)
    assert key in message.split(":")[0] or f"'{key}'" in message, message
    assert "\n" not in message


def test_device_path_falls_back_to_the_workers_for_pil_only_steps(shard, caplog):
    """A transform with a step the device cannot run (here a rotation) runs whole in the workers, once said."""
    cfg = load_config(TINY, ["data.decode=device"])
    bundle = build_model(cfg.model)
    steps = bundle.preprocess_train.transforms
    bundle.preprocess_train = T.Compose([steps[0], T.RandomRotation(10), *steps[1:]])
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        source = WebDatasetSource(str(shard), cfg.data, "resampled", 0, 12, 0, 1, bundle, torch.device("cpu"))
    try:
        images, _, _ = source.next_batch_with_info()
    finally:
        source.close()
    assert images.shape == (12, 3, SIZE, SIZE) and images.dtype == torch.float32
    said = [r.getMessage() for r in caplog.records if "only runs on PIL images" in r.getMessage()]
    assert len(said) == 1 and "data.decode=device" in said[0]
