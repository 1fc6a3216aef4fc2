"""Fast decoding: the reduced-size CPU path, the device path and the nvJPEG path give the same tensors up
to resampling differences (the GPU paths run here on the CPU, through the same code)."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from helpers import TINY
from PIL import Image

from pretrain.config import load_config
from pretrain.data.decode import decode_cpu, decode_uint8, open_image, raw_image_bytes
from pretrain.data.loader import WebDatasetSource
from pretrain.models.build import build_model
from webshards.layout import ShardWriter, key_for, write_sizes
from webshards.samples import BadSample


def photo(seed: int, w: int, h: int) -> bytes:
    """A smooth, photo-like JPEG (gradients and blobs) much larger than the 64 px model input."""
    ys, xs = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(seed)
    channels = [np.sin(xs * rng.uniform(2, 8) + ys * rng.uniform(2, 8) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def large_shard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large")
    with ShardWriter(folder, 0) as writer:
        for i in range(12):
            writer.add(key_for(0, i), photo(i, 640 + 37 * i, 480 + 23 * i), f"photo {i}", {"path": f"p{i}"})
    write_sizes(folder)
    return folder / "00000.tar"


def batches(shard, decode: str, mode: str = "eval") -> torch.Tensor:
    return batch_by_key(shard, decode, mode)[0]


def batch_by_key(shard, decode: str, mode: str) -> tuple[torch.Tensor, list[str]]:
    bundle = build_model(load_config(TINY).model)
    cfg = load_config(TINY, [f"data.decode={decode}"]).data
    source = WebDatasetSource(str(shard), cfg, mode, 0, 12, 0, 1, bundle, torch.device("cpu"))
    images, _, info = source.next_batch_with_info()
    return images, info["keys"]


@pytest.mark.parametrize("decode", ["device", "nvjpeg"])
def test_device_paths_match_the_cpu_path(large_shard, decode):
    cpu, other = batches(large_shard, "cpu"), batches(large_shard, decode)
    assert cpu.shape == other.shape == (12, 3, 64, 64)
    diff = (cpu - other).abs()
    # Normalised units (0.06 is ~4/255 of a pixel value): the CPU path resamples a 1/8-scale DCT decode,
    # nvJPEG the full image; nothing else differs.
    assert diff.mean() < 0.06 and diff.max() < 0.5


def test_device_augmentation_replays_the_cpu_paths_random_crops(large_shard):
    """Training transform (RandomResizedCrop): the device path takes each sample's crop from the seed the
    worker drew, so it gives the cpu path's batch, not a center crop."""
    (cpu, keys), (device, device_keys) = (
        batch_by_key(large_shard, d, "resampled") for d in ("cpu", "device")
    )
    assert keys == device_keys
    same = (cpu - device).abs().mean()
    assert same < 0.01  # ~1/255 of a pixel value: the same crops, resampled alike
    center, eval_keys = batch_by_key(large_shard, "device", "eval")
    center = center[[eval_keys.index(k) for k in keys]]  # the same samples, resized and center-cropped
    assert (device - center).abs().mean() > 10 * same


def test_draft_decodes_large_jpegs_at_reduced_size():
    raw = {"jpg": photo(0, 1024, 768), "txt": b"x"}
    image = open_image(raw, 64)
    assert min(image.size) >= 64 and image.size[0] <= 1024 // 4  # 1/8 scale gives 128x96: both >= 64


@pytest.mark.parametrize(
    "raw, reason",
    [({"txt": b"x"}, "missing_image"), ({"jpg": b"garbage", "txt": b"x"}, "bad_image"),
     ({"jpg": photo(1, 80, 80)}, "missing_caption"), ({"jpg": photo(1, 80, 80), "txt": b"\xff\xfe"}, "bad_caption"),
     ({"jpg": photo(1, 80, 80), "txt": b"  "}, "empty_caption")],
)  # fmt: skip
def test_bad_samples_name_their_reason(raw, reason):
    with pytest.raises(BadSample) as err:
        decode_cpu(raw, transform=lambda im: im, size=64)
    assert err.value.reason == reason


@pytest.mark.parametrize("is_train", [True, False])
def test_tensor_transform_equals_the_pil_transform(is_train):
    """open_clip's ViT-B/32 transforms run on uint8 tensors: same random crops, same pixels up to resampling."""
    import open_clip

    from pretrain.data.transform import TensorTransform

    transform = open_clip.image_transform(224, is_train=is_train)
    fast = TensorTransform.wrap(transform)
    assert fast is not None
    images = [open_image({"jpg": photo(i, 500 + 61 * i, 400 + 37 * i)}, 224) for i in range(6)]
    torch.manual_seed(0)
    reference = torch.stack([transform(im) for im in images])
    next_draw_pil = torch.rand(1)
    torch.manual_seed(0)
    uint8 = torch.stack([fast.geometric(im) for im in images])
    assert torch.rand(1) == next_draw_pil  # the same random draws: seeds and resume behave as before
    assert uint8.dtype == torch.uint8 and uint8.shape == (6, 3, 224, 224)
    diff = (fast.normalize(uint8) - reference).abs()
    # normalised units: 0.015 is ~1/255 of a pixel value; a different crop would differ by far more
    assert diff.mean() < 0.015 and diff.max() < 0.1


def test_tensor_transform_normalize_is_to_tensor_then_normalize():
    import open_clip
    from torchvision.transforms import functional as TF

    from pretrain.data.transform import TensorTransform

    transform = open_clip.image_transform(32, is_train=False)
    u8 = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    expected = transform.transforms[-1](TF.to_tensor(Image.fromarray(u8.permute(1, 2, 0).numpy())))
    torch.testing.assert_close(TensorTransform.wrap(transform).normalize(u8), expected, rtol=1e-5, atol=1e-5)


def test_transforms_that_differ_on_tensors_are_left_to_pil():
    from torchvision import transforms as T

    from pretrain.data.transform import TensorTransform

    normalize = T.Normalize((0.5,) * 3, (0.5,) * 3)
    assert TensorTransform.wrap(T.Compose([T.RandomRotation(10), T.ToTensor(), normalize])) is None
    assert (
        TensorTransform.wrap(T.Compose([T.Resize(32, T.InterpolationMode.NEAREST), T.ToTensor(), normalize]))
        is None
    )
    assert TensorTransform.wrap(T.Compose([T.Resize(32), T.ToTensor()])) is None  # no Normalize
    assert TensorTransform.wrap(lambda im: im) is None


@pytest.mark.parametrize(
    "decode",
    [functools.partial(decode_cpu, transform=lambda im: im, size=64), functools.partial(decode_uint8, size=64),
     raw_image_bytes],
    ids=["cpu", "device", "nvjpeg"],
)  # fmt: skip
def test_images_over_max_image_pixels_are_bad_samples_on_every_path(decode):
    """open_clip main's `--max-image-pixels`: width x height from the header, over the limit: a bad sample."""
    small, big = {"jpg": photo(1, 400, 300), "txt": b"x"}, {"jpg": photo(0, 1000, 600), "txt": b"x"}
    decode(small, max_pixels=500_000)
    decode(big, max_pixels=None)
    with pytest.raises(BadSample) as err:
        decode(big, max_pixels=500_000)
    assert err.value.reason == "too_many_pixels" and "1000x600" in str(err.value)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_training_stream_skips_images_over_data_max_image_pixels(large_shard, decode):
    """The large shard's photos are (640 + 37 i) x (480 + 23 i): the limit keeps exactly those within it (the
    shard shuffled whole, so without the limit the first batch would hold larger ones too)."""
    limit = 600_000
    within = {key_for(0, i) for i in range(12) if (640 + 37 * i) * (480 + 23 * i) <= limit}
    bundle = build_model(load_config(TINY).model)
    cfg = load_config(
        TINY, [f"data.decode={decode}", f"data.max_image_pixels={limit}", "data.shuffle_buffer=12"]
    )
    source = WebDatasetSource(
        str(large_shard), cfg.data, "epoch", 0, len(within), 0, 1, bundle, torch.device("cpu")
    )
    _, _, info = source.next_batch_with_info()
    assert set(info["keys"]) == within and 0 < len(within) < 12
