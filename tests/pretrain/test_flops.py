"""The FLOPs-per-sample formula (pretrain/training/flops.py) against torch's own FLOP counter on real open_clip
models, and the peak-FLOP/s lookup behind MFU."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models.build import model_config, register_model_configs
from pretrain.training.flops import (
    clip_forward_flops,
    mfu,
    peak_flops,
    text_forward_flops,
    train_flops_per_sample,
    vision_forward_flops,
)


def counted_flops(name: str, backward: bool = False) -> tuple[int, dict]:
    """FLOPs torch counts for one image-text pair through open_clip's `name` (random init, CPU).

    The math attention backend decomposes attention into matmuls the counter sees (the fused CPU kernel
    is not in its table)."""
    register_model_configs()
    cfg = model_config(name)
    model = open_clip.create_model(name, pretrained=None)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    image, text = torch.randn(1, 3, size, size), torch.randint(1, 1000, (1, ctx))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        image_f, text_f, _ = model(image, text)[:3]
        if backward:
            (image_f.sum() + text_f.sum()).backward()
    return counter.get_total_flops(), cfg


@pytest.mark.parametrize("name", ["tiny-clip", "ViT-B-32"])
def test_forward_flops_match_torch_flop_counter(name):
    counted, cfg = counted_flops(name)
    assert clip_forward_flops(cfg) == pytest.approx(counted, rel=0.10)


def test_train_flops_match_counted_forward_and_backward():
    counted, cfg = counted_flops("tiny-clip", backward=True)
    assert train_flops_per_sample(cfg) == pytest.approx(counted, rel=0.15)


@pytest.mark.parametrize(
    "name, image_gflops, text_gflops",
    [
        ("ViT-B-32", 8.82, 5.96),
        ("ViT-B-16", 35.13, 5.96),
        ("ViT-L-14", 162.03, 13.3),
        ("ViT-H-14", 334.59, 47.09),
    ],
)
def test_towers_match_open_clip_published_profile(name, image_gflops, text_gflops):
    """open_clip's docs/model_profile.csv (forward GFLOPs per image and per text, at batch 1)."""
    cfg = model_config(name)
    embed_dim = cfg["embed_dim"]
    assert vision_forward_flops(cfg["vision_cfg"], embed_dim) / 1e9 == pytest.approx(image_gflops, rel=0.02)
    assert text_forward_flops(cfg["text_cfg"], embed_dim) / 1e9 == pytest.approx(text_gflops, rel=0.02)


def test_unsupported_towers_give_none():
    cfg = {"embed_dim": 512, "vision_cfg": {"timm_model_name": "convnext_base"}, "text_cfg": {}}
    assert train_flops_per_sample(cfg) is None and train_flops_per_sample(None) is None
    assert mfu(None, 100.0, 1e15, 1) is None and mfu(1e9, 100.0, None, 1) is None


@pytest.mark.parametrize(
    "device_name, bf16_tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
    ],
)
def test_peak_flops_lookup_by_device_name(monkeypatch, device_name, bf16_tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert peak_flops(torch.device("cuda", 0), "bf16") == pytest.approx(bf16_tflops * 1e12)


def test_peak_flops_unknown_or_cpu_is_none_and_override_wins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(torch.device("cuda", 0), "bf16") is None
    assert peak_flops(torch.device("cpu"), "fp32") is None
    assert peak_flops(torch.device("cpu"), "fp32", override_tflops=2.5) == 2.5e12


def test_mfu_is_achieved_over_peak_of_all_devices():
    # 1e9 FLOPs/sample at 1000 samples/s = 1e12 FLOP/s, over 4 devices of 1e12 peak each: 25 %.
    assert mfu(1e9, 1000.0, 1e12, 4) == pytest.approx(0.25)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_peak_tflops_override_must_be_positive(value):
    from helpers import TINY

    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^log\.peak_tflops: must be > 0 or null$"):
        load_config(TINY, [f"log.peak_tflops={value}"])
    assert load_config(TINY, ["log.peak_tflops=989.4"]).log.peak_tflops == 989.4
