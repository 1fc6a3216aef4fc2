"""Model FLOPs per training sample of a CLIP model (from its open_clip config) and peak device FLOP/s,
the two halves of MFU (model FLOPs utilisation).

Counting convention (the one torch.utils.flop_counter uses): a multiply-add is 2 FLOPs; only matrix
products count (linear layers, the patch convolution, attention scores and values); norms, activations,
softmax and the loss are left out (well under 1% of a ViT's FLOPs). A transformer layer over N tokens of
width d with MLP ratio r costs

    2·N·d²·(4 + 2r)  (q, k, v and output projections: 4d², MLP: 2rd², per token)  +  4·N²·d  (QKᵀ and AV)

forward. Training costs 3× forward (backward ≈ 2× forward); recomputation (activation checkpointing,
the no-grad feature pass of gradient accumulation) is not counted: MFU counts the model's FLOPs, not the
hardware's.
"""

from __future__ import annotations

import torch

TRAIN_FACTOR = 3
"""Forward + backward FLOPs over forward FLOPs."""

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's data sheets: bf16 tensor cores, TF32 tensor cores
# (fp32 matmuls when torch allows TF32), plain fp32. The first name that occurs in the device name wins.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # before H200: the name contains it
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM (HBM3)
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
]


def transformer_forward_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `layers` pre-norm transformer blocks over `tokens` tokens (one sample)."""
    per_layer = 2 * tokens * width**2 * (4 + 2 * mlp_ratio) + 4 * tokens**2 * width
    return float(layers * per_layer)


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def vision_forward_flops(vision: dict, embed_dim: int) -> float:
    """A ViT image tower: patch embedding, blocks over the patches and the class token, projection."""
    (h, w), (ph, pw) = _pair(vision.get("image_size", 224)), _pair(vision.get("patch_size", 16))
    patches, width = (h // ph) * (w // pw), int(vision.get("width", 768))
    patch_embed = 2 * patches * (3 * ph * pw) * width
    blocks = transformer_forward_flops(
        patches + 1, width, int(vision.get("layers", 12)), float(vision.get("mlp_ratio", 4.0))
    )
    return patch_embed + blocks + 2 * width * embed_dim


def text_forward_flops(text: dict, embed_dim: int) -> float:
    """The text transformer over the full context (the causal mask does not skip work), projection."""
    tokens = int(text.get("context_length", 77)) + (1 if text.get("embed_cls") else 0)
    width = int(text.get("width", 512))
    blocks = transformer_forward_flops(
        tokens, width, int(text.get("layers", 12)), float(text.get("mlp_ratio", 4.0))
    )
    projection = 0 if text.get("proj_type") == "none" else 2 * width * embed_dim
    return blocks + projection


def _supported(cfg: dict) -> bool:
    """A plain CLIP of open_clip's own ViT and text transformer (no timm/HF towers, ResNets or CoCa)."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    return (
        "multimodal_cfg" not in cfg
        and not vision.get("timm_model_name")
        and not vision.get("attentional_pool")
        and isinstance(vision.get("layers", 12), int)
        and not text.get("hf_model_name")
    )


def clip_forward_flops(cfg: dict) -> float | None:
    """Forward FLOPs of one image-text pair for an open_clip model config dict (None when unsupported)."""
    if not _supported(cfg):
        return None
    embed_dim = int(cfg["embed_dim"])
    return vision_forward_flops(cfg.get("vision_cfg", {}), embed_dim) + text_forward_flops(
        cfg.get("text_cfg", {}), embed_dim
    )


def train_flops_per_sample(cfg: dict | None) -> float | None:
    """Model FLOPs of one training sample (forward + backward), or None when the model is not covered."""
    forward = clip_forward_flops(cfg) if cfg else None
    return None if forward is None else TRAIN_FACTOR * forward


def matmul_kind(precision: str) -> str:
    """Which peak applies: bf16 autocast, TF32 (fp32 matmuls allowed to use TF32), or plain fp32."""
    if precision == "bf16":
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak dense FLOP/s of one device: the override, else the table for a known GPU, else None (CPU too)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[matmul_kind(precision)] * 1e12
    return None


def mfu(
    flops_per_sample: float | None, samples_per_s: float, peak_per_device: float | None, world_size: int
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (None if either is unknown)."""
    if not flops_per_sample or not peak_per_device:
        return None
    return flops_per_sample * samples_per_s / (peak_per_device * world_size)
