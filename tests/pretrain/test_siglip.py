"""SigLipLoss equals open_clip's on the full batch: in one process, tiled, with accumulated micro-batches,
and split over ranks that pass texts around the ring; the tiny-siglip model builds and learns with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import torchrun
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

from pretrain.config import ModelConfig
from pretrain.loss import SigLipLoss
from pretrain.models.build import build_model

TOL = {"rtol": 1e-5, "atol": 1e-6}


def features(n: int = 24, d: int = 32, seed: int = 0):
    """fp32 L2-normalised features, scale and bias away from their init so every gradient is sizeable."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(n, d, generator=g), dim=-1)
    return img, txt, torch.tensor(7.5), torch.tensor(-2.5)


def reference(img, txt, scale, bias):
    """open_clip's loss on the full batch in one process, and its gradients w.r.t. all four inputs."""
    leaves = [x.clone().requires_grad_() for x in (img, txt, scale, bias)]
    loss = OpenClipSigLipLoss()(*leaves)
    loss.backward()
    return loss.detach(), *(x.grad for x in leaves)


@pytest.mark.parametrize("chunk", [None, 1, 5, 24, 100])
def test_equals_open_clip_in_value_and_gradients(chunk):
    img, txt, scale, bias = features()
    leaves = [x.clone().requires_grad_() for x in (img, txt, scale, bias)]
    loss = SigLipLoss(chunk_size=chunk)(*leaves)
    loss.backward()
    ours = (loss.detach(), *(x.grad for x in leaves))
    for a, b in zip(ours, reference(img, txt, scale, bias)):
        torch.testing.assert_close(a, b, **TOL)


def test_accumulated_micro_batches_equal_full_batch():
    """The trainer's accumulation: micro-batch j with gradients, the others as cached (detached) features,
    scale and bias differentiated once; every micro-step's loss and the summed gradients are the full batch's."""
    img, txt, scale, bias = features()
    ref_loss, *ref_grads = reference(img, txt, scale, bias)
    micro = 3
    i_chunks, t_chunks = img.chunk(micro), txt.chunk(micro)
    s, b = scale.clone().requires_grad_(), bias.clone().requires_grad_()
    grads_i, grads_t = [], []
    for j in range(micro):
        i_j, t_j = i_chunks[j].clone().requires_grad_(), t_chunks[j].clone().requires_grad_()
        images = torch.cat([*i_chunks[:j], i_j, *i_chunks[j + 1 :]])
        texts = torch.cat([*t_chunks[:j], t_j, *t_chunks[j + 1 :]])
        last = j == micro - 1
        loss = SigLipLoss()(images, texts, s if last else s.detach(), b if last else b.detach())
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss, **TOL)
        grads_i.append(i_j.grad)
        grads_t.append(t_j.grad)
    for ours, ref in zip((torch.cat(grads_i), torch.cat(grads_t), s.grad, b.grad), ref_grads):
        torch.testing.assert_close(ours, ref, **TOL)


def test_bf16_features_sum_in_fp32():
    """bf16 features (as under autocast): the B x N terms are summed in fp32, so the loss stays within
    1e-4 of open_clip's fp64 loss on the same (bf16-rounded) features."""
    img, txt, scale, bias = (x.bfloat16() for x in features(n=256))
    ref = OpenClipSigLipLoss()(img.double(), txt.double(), scale.double(), bias.double())
    ours = SigLipLoss(chunk_size=100)(img, txt, scale, bias)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) < 1e-4 * ref.item()


@pytest.mark.parametrize(("world", "chunk"), [(2, 0), (3, 5)])
def test_ring_over_ranks_equals_full_batch(tmp_path, world, chunk):
    """W ranks x B/W passing texts around the ring == open_clip on the whole batch in one process: the mean
    of the ranks' losses is the full loss, and each rank's feature gradients (which carry every rank's
    contribution) are W x its slice of the full gradient, so DDP's averaging gives the full gradient."""
    img, txt, scale, bias = features()
    torch.save((img, txt, scale, bias), tmp_path / "features.pt")
    worker = Path(__file__).with_name("siglip_worker.py")
    args = [str(worker), str(tmp_path / "features.pt"), str(tmp_path / "rank"), str(chunk)]
    proc = torchrun(world, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_loss, ref_i, ref_t, ref_s, ref_b = reference(img, txt, scale, bias)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    torch.testing.assert_close(torch.stack([r[0] for r in results]).mean(), ref_loss, **TOL)
    n = img.shape[0] // world
    for rank, (_, gi, gt, gs, gb) in enumerate(results):
        mine = slice(rank * n, (rank + 1) * n)
        torch.testing.assert_close(gi / world, ref_i[mine], **TOL)
        torch.testing.assert_close(gt / world, ref_t[mine], **TOL)
        torch.testing.assert_close(gs, ref_s, **TOL)
        torch.testing.assert_close(gb, ref_b, **TOL)


def test_rejects_bad_chunk_size_and_unpaired_batches():
    with pytest.raises(ValueError, match="chunk_size"):
        SigLipLoss(chunk_size=0)
    img, txt, scale, bias = features()
    with pytest.raises(ValueError, match="as many texts as images"):
        SigLipLoss()(img, txt[:-1], scale, bias)


def test_tiny_siglip_builds_with_sigmoid_init_and_clip_tokenizer():
    """SigLIP's init (t' = log 10, b = -10, as open_clip's `--siglip` training sets), a `logit_bias` in the
    output dict, and open_clip's BPE tokenizer (no `transformers`)."""
    bundle = build_model(ModelConfig(name="tiny-siglip"))
    model = bundle.model
    assert isinstance(bundle.tokenizer, open_clip.SimpleTokenizer)
    assert math.isclose(model.logit_scale.exp().item(), 10.0, rel_tol=1e-6)
    model.output_dict = True
    out = model(torch.rand(2, 3, 64, 64), bundle.tokenizer(["a red circle", "a blue square"]))
    assert out["logit_bias"].item() == -10.0
    assert out["image_features"].shape == out["text_features"].shape == (2, 128)


def test_tiny_siglip_tokenizer_is_the_one_open_clip_loads_from_an_export(tmp_path):
    """What open_clip picks for the config in an export folder (`local-dir:`) tokenizes identically."""
    bundle = build_model(ModelConfig(name="tiny-siglip"))
    config = {"model_cfg": open_clip.get_model_config("tiny-siglip")}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    exported = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    captions = ["a red circle on a blue ground", "two small green squares"]
    assert torch.equal(bundle.tokenizer(captions), exported(captions))


def test_sgd_steps_on_tiny_siglip_reduce_the_loss():
    """A smoke test: a few SGD steps of SigLipLoss through the tiny-siglip model on synthetic pairs."""
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="tiny-siglip"))
    model = bundle.model
    model.output_dict = True
    images = torch.rand(8, 3, 64, 64)
    texts = bundle.tokenizer([f"picture number {i}" for i in range(8)])
    loss_fn, opt = SigLipLoss(), torch.optim.SGD(model.parameters(), lr=0.005)
    losses = []
    for _ in range(5):
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
