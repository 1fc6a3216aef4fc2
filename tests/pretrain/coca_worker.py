"""Run under torchrun by test_coca.py: each rank trains on its contiguous slice of the batch like DDP does
(loss on the slice, gradients averaged over ranks) and rank 0 saves the averaged gradients.

Two passes: the full CoCaLoss with one micro-batch per rank, and the caption part alone with each rank's
slice split into two micro-batches (gradients summed over micro-steps, as accumulation does).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `helpers` (which test_coca imports) from tests/, after the checkout itself: tests/ first would make `pretrain`
# a namespace package of tests/pretrain and pretrain/, whose __init__.py never runs
TESTS = Path(__file__).resolve().parent.parent
sys.path[0:0] = [str(TESTS.parent), str(TESTS)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_coca import CoCaLoss  # noqa: E402  (this folder is sys.path[0] for a script)

from pretrain.config import ModelConfig  # noqa: E402
from pretrain.loss import count_target_tokens  # noqa: E402
from pretrain.models.build import build_model  # noqa: E402


def build_tiny_coca() -> torch.nn.Module:
    """The same model as test_coca.py's (seeded init, float64 so sums in other orders agree closely)."""
    torch.manual_seed(0)
    return build_model(ModelConfig(name="tiny-coca")).model.double()


def averaged_grads(model: torch.nn.Module, world: int) -> list[torch.Tensor]:
    """DDP's gradient: the mean over ranks (zeros where a parameter got none)."""
    grads = []
    for p in model.parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads.append((g / world).float())  # fp32 on disk: half the bytes, rounding far below the rtol
    model.zero_grad(set_to_none=True)
    return grads


def full_pass(model, images, texts, world) -> tuple[dict, list[torch.Tensor]]:
    out = model(images, texts)
    total, parts = CoCaLoss(clip_weight=1.0, caption_weight=2.0)(
        out["image_features"], out["text_features"], out["logit_scale"], out["logits"], out["labels"],
        count_target_tokens(texts),
    )  # fmt: skip
    total.backward()
    return {"total": total.detach(), **parts}, averaged_grads(model, world)


def caption_accumulated(model, images, texts, world) -> list[torch.Tensor]:
    half = images.shape[0] // 2
    micro = [(images[:half], texts[:half]), (images[half:], texts[half:])]
    count = count_target_tokens([t for _, t in micro])
    loss_fn = CoCaLoss(clip_weight=0.0, caption_weight=1.0)
    for imgs, txts in micro:
        out = model(imgs, txts)
        total, _ = loss_fn(
            out["image_features"],
            out["text_features"],
            out["logit_scale"],
            out["logits"],
            out["labels"],
            count,
        )
        total.backward()
    return averaged_grads(model, world)


def main(batch_file: str, out_prefix: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, texts = torch.load(batch_file)
    n = images.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    model = build_tiny_coca()
    parts, grads = full_pass(model, images[mine], texts[mine], world)
    caption_grads = caption_accumulated(model, images[mine], texts[mine], world)
    torch.save(parts, f"{out_prefix}{rank}.pt")
    if rank == 0:
        torch.save((grads, caption_grads), f"{out_prefix}grads.pt")
    dist.barrier()  # a rank tearing gloo down while its peer still sends aborts ("terminate called ...")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
