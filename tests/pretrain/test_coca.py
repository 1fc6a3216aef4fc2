"""CoCa: tiny-coca builds as open_clip's CoCa; ClipLoss + caption_loss (and the `coca` objective) equal
open_clip's CoCaLoss; the caption loss over the global token count makes micro-batches and ranks train
exactly like the full batch, whatever the caption lengths."""

from __future__ import annotations

import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cmd, torchrun
from open_clip.loss import CoCaLoss as OpenClipCoCaLoss

from pretrain.config import LossConfig, ModelConfig
from pretrain.loss import ClipLoss, caption_loss, count_target_tokens
from pretrain.loss.coca import PAD_ID
from pretrain.models.build import build_model, context_length
from pretrain.objectives.objective import MicroStep, features
from pretrain.objectives.specs.coca import SPEC as COCA
from pretrain.parallel.distributed import world

# Short captions first, long ones last: halves (micro-batches, ranks) have very different token counts.
CAPTIONS = [
    "dog",
    "a red circle",
    "two cats",
    "a small blue square",
    "a large green triangle above a yellow star on a white background",
    "the photo shows three orange circles and one purple square next to each other",
    " ".join(["a very long caption that the tokenizer must truncate"] * 4),
    "a cat sitting on a mat near the window in the afternoon sun",
]


class CoCaLoss(torch.nn.Module):
    """The CoCa loss in one call, from the pieces the `coca` objective adds up: `clip_weight` x contrastive +
    `caption_weight` x caption loss; returns (total, parts), the parts unweighted and detached.

    Each value is this rank's share scaled so that DDP's gradient average over ranks gives the full-batch
    gradient (the contrastive part through `ClipLoss`'s gathered negatives, the caption part through the
    factor W = world size); the mean over ranks of each part is the full batch's value. Under gradient
    accumulation, the caption parts of the micro-steps add up to the step's caption loss (call this once
    per micro-batch with the step's `token_count` and sum), while the contrastive part of each micro-step
    is already the loss of the whole accumulated batch. Defaults follow open_clip's training defaults
    (`--coca-contrastive-loss-weight 1`, `--coca-caption-loss-weight 2`).
    """

    def __init__(
        self,
        clip_weight: float = 1.0,
        caption_weight: float = 2.0,
        pad_id: int = PAD_ID,
        chunk_size: int | None = None,
        ring: bool = False,
    ) -> None:
        super().__init__()
        self.clip_weight, self.caption_weight, self.pad_id = clip_weight, caption_weight, pad_id
        self.clip_loss = ClipLoss(chunk_size=chunk_size, ring=ring)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        token_count: torch.Tensor | int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.clip_weight:
            contrastive = self.clip_loss(image_features, text_features, logit_scale)
        else:  # as open_clip: no contrastive graph at all (the logit scale gets no gradient)
            contrastive = logits.new_zeros(())
        caption = world()[1] * caption_loss(logits, labels, self.pad_id, token_count)
        total = self.clip_weight * contrastive + self.caption_weight * caption
        return total, {"contrastive": contrastive.detach(), "caption": caption.detach()}


def build_tiny_coca(dtype: torch.dtype = torch.float64):
    """tiny-coca with a seeded init (coca_worker.py builds the same model)."""
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="tiny-coca"))
    return bundle.model.to(dtype), bundle.tokenizer


@pytest.fixture(scope="module")
def batch():
    _, tokenizer = build_tiny_coca()
    g = torch.Generator().manual_seed(1)
    return torch.randn(len(CAPTIONS), 3, 64, 64, generator=g, dtype=torch.float64), tokenizer(CAPTIONS)


def grads_of(loss: torch.Tensor, model: torch.nn.Module, retain: bool = False) -> list[torch.Tensor]:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_grads_close(ours, ref, rtol, atol) -> None:
    """Each gradient tensor within `rtol` of the reference, near-zero entries measured against the tensor's
    largest one (rounding in float32 is absolute there: sums in another order differ by ~1e-7 of the scale)."""
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol + rtol * b.abs().max().item())


def test_tiny_coca_builds_with_open_clip_tokenizer_and_outputs_a_dict(batch):
    model, tokenizer = build_tiny_coca(torch.float32)
    assert isinstance(model, open_clip.CoCa)
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)  # no Hugging Face tokenizer, no transformers
    images, texts = batch
    out = model(images.float(), texts)
    assert {"image_features", "text_features", "logit_scale", "logits", "labels"} <= set(out)
    assert out["logits"].shape == (len(CAPTIONS), context_length(model) - 1, 49408)
    torch.testing.assert_close(out["labels"], texts[:, 1:])


def test_caption_projection_is_initialised_whatever_memory_held(monkeypatch):
    """open_clip allocates the decoder's output projection with torch.empty and never initialises it."""
    empty = torch.empty

    def garbage(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", garbage)
    model, _ = build_tiny_coca(torch.float32)
    assert [n for n, p in model.named_parameters() if not torch.isfinite(p).all()] == []
    std = model.text_decoder.text_projection.std().item()
    assert abs(std / 128**-0.5 - 1) < 0.05  # normal, std width**-0.5 (open_clip's intent)


NO_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # any `import transformers` now fails
import torch
from pretrain.config import ModelConfig
from pretrain.models.build import build_model
bundle = build_model(ModelConfig(name="tiny-coca"))
out = bundle.model(torch.randn(2, 3, 64, 64), bundle.tokenizer(["a red circle", "two cats"]))
print(sorted(out))
"""


def test_tiny_coca_needs_no_transformers():
    proc = run_cmd([sys.executable, "-c", NO_TRANSFORMERS])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == str(
        sorted(["image_features", "text_features", "logits", "logit_scale", "labels"])
    )


def test_count_target_tokens_counts_every_predicted_token(batch):
    """Every caption token after the start token, the end token included, truncated to the context."""
    _, texts = batch
    model, tokenizer = build_tiny_coca()
    limit = context_length(model) - 1
    expected = sum(min(len(tokenizer.encode(c)) + 1, limit) for c in CAPTIONS)
    assert count_target_tokens(texts).item() == expected
    assert count_target_tokens([texts[:3], texts[3:]]).item() == expected


def test_equals_open_clip_coca_loss_in_value_and_gradient(batch):
    model, _ = build_tiny_coca(torch.float32)
    images, texts = batch
    out = model(images.float(), texts)
    args = (out["image_features"], out["text_features"], out["logit_scale"], out["logits"], out["labels"])
    total, parts = CoCaLoss(clip_weight=0.5, caption_weight=2.0)(*args, count_target_tokens(texts))
    ours = grads_of(total, model)

    out = model(images.float(), texts)
    ref_clip, ref_caption = OpenClipCoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.5)(
        out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
    )
    ref = grads_of(ref_clip + ref_caption, model)
    torch.testing.assert_close(total, ref_clip + ref_caption, rtol=1e-5, atol=0)
    torch.testing.assert_close(0.5 * parts["contrastive"], ref_clip, rtol=1e-5, atol=0)
    torch.testing.assert_close(2.0 * parts["caption"], ref_caption, rtol=1e-5, atol=0)
    assert_grads_close(ours, ref, rtol=1e-5, atol=1e-8)
    objective = COCA.build(LossConfig(clip_weight=0.5, caption_weight=2.0))  # the trainer's: the same sum
    objective.begin_step([(images, texts)])
    out = model(images.float(), texts)
    total = objective.total(objective.compute(MicroStep(features(out), out, texts, None), last=True))
    torch.testing.assert_close(total, (ref_clip + ref_caption).float(), rtol=1e-5, atol=0)


def full_batch_caption_loss(model, images, texts) -> torch.Tensor:
    """The reference: torch's own mean over the non-pad targets of the whole batch."""
    out = model(images, texts)
    return F.cross_entropy(out["logits"].permute(0, 2, 1), out["labels"], ignore_index=0)


def test_micro_batches_with_the_global_count_equal_the_full_batch(batch):
    model, _ = build_tiny_coca()
    images, texts = batch
    ref = full_batch_caption_loss(model, images, texts)
    ref_grads = grads_of(ref, model)

    halves = [slice(0, 4), slice(4, 8)]
    count = count_target_tokens([texts[h] for h in halves])
    summed, naive = None, None
    for h in halves:
        out = model(images[h], texts[h])
        ours = caption_loss(out["logits"], out["labels"], 0, count)
        own = caption_loss(out["logits"], out["labels"], 0, count_target_tokens(texts[h]))
        g, g_naive = (
            grads_of(ours, model, retain=True),
            grads_of(own / len(halves), model),
        )  # naive: mean of micro means
        summed = g if summed is None else [a + b for a, b in zip(summed, g)]
        naive = g_naive if naive is None else [a + b for a, b in zip(naive, g_naive)]
    assert_grads_close(summed, ref_grads, rtol=1e-9, atol=1e-12)
    # The test has teeth: normalising each micro-batch by its own count trains differently.
    flat = lambda gs: torch.cat([x.flatten() for x in gs])  # noqa: E731
    assert (flat(naive) - flat(ref_grads)).norm() > 0.05 * flat(ref_grads).norm()


def test_two_ranks_equal_one_process_on_the_full_batch(batch, tmp_path):
    """2 ranks (contrastive + caption; and caption with 2 micro-batches per rank) under DDP's gradient mean."""
    images, texts = batch
    torch.save((images, texts), tmp_path / "batch.pt")
    worker = Path(__file__).with_name("coca_worker.py")
    proc = torchrun(2, [str(worker), str(tmp_path / "batch.pt"), str(tmp_path / "rank")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    grads, caption_grads = torch.load(tmp_path / "rankgrads.pt")

    model, _ = build_tiny_coca()
    out = model(images, texts)
    ref_clip, ref_caption = OpenClipCoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
        out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
    )
    ref = grads_of(ref_clip + ref_caption, model)
    mean = {k: (parts[0][k] + parts[1][k]) / 2 for k in parts[0]}
    torch.testing.assert_close(mean["contrastive"], ref_clip, rtol=1e-9, atol=0)
    torch.testing.assert_close(2.0 * mean["caption"], ref_caption, rtol=1e-9, atol=0)
    torch.testing.assert_close(mean["total"], ref_clip + ref_caption, rtol=1e-9, atol=0)
    assert_grads_close(grads, ref, rtol=1e-5, atol=1e-9)
    assert_grads_close(
        caption_grads, grads_of(full_batch_caption_loss(model, images, texts), model), 1e-5, 1e-9
    )
