"""LoRA and GLAD (pretrain/adapt/lora.py, glad.py) against outside references: open_clip's own forward and
loader (`local-dir:`), parameter counts from the model's shapes, and GLAD's term and update written out by hand
(closed forms for a quadratic loss, torch.func transforms for a small network)."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pretrain.adapt.glad import GLADConfig, glad_objective
from pretrain.adapt.lora import LoRAConfig, apply_lora, lora_parameters, merge_lora
from pretrain.models.build import MODEL_CONFIG_DIR, register_model_configs
from pretrain.publish.export import preprocess_cfg

ALL = ("q", "k", "v", "out", "mlp")
CLASSES = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    """A random tiny-clip, frozen and in eval mode: what open_clip computes without adapters."""
    register_model_configs()
    torch.manual_seed(0)
    return open_clip.create_model("tiny-clip").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 images of 4 classes, and the classes' prompts tokenized by open_clip."""
    register_model_configs()
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(8) % 4
    images = torch.randn(8, 3, 64, 64, generator=g) + labels.view(-1, 1, 1, 1).float()
    return images, open_clip.get_tokenizer("tiny-clip")(CLASSES), labels


def embeddings(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts, _ = batch
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def classification_loss(model, batch) -> torch.Tensor:
    """CLIP-LoRA's loss: cross-entropy of the scaled cosine similarities of images and class prompts."""
    images, texts, labels = batch
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(texts), dim=-1)
    return F.cross_entropy(model.logit_scale.exp() * img @ txt.t(), labels)


def train(model, batch, steps: int, glad: GLADConfig | None = None) -> list[float]:
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        if glad is None:
            loss = classification_loss(model, batch)
            total = loss
        else:
            loss, term = glad_objective(model, batch, classification_loss, glad)
            total = loss + term
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("targets", [("q", "k", "v"), ALL])
def test_zero_steps_leave_every_output_unchanged(base, batch, targets) -> None:
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(targets=targets))
    for ours, theirs in zip(embeddings(model, batch), embeddings(base, batch)):
        assert torch.equal(ours, theirs)


def expected_count(model: torch.nn.Module, cfg: LoRAConfig) -> int:
    """r·(in + out) for each adapted matrix, from the model's own shapes."""
    total = 0
    for tower in (model.visual.transformer, model.transformer):
        for block in tower.resblocks:
            d = block.attn.embed_dim
            total += sum(cfg.rank * (d + d) for t in ("q", "k", "v") if t in cfg.targets)
            mats = ([block.attn.out_proj] if "out" in cfg.targets else []) + (
                [block.mlp.c_fc, block.mlp.c_proj] if "mlp" in cfg.targets else []
            )
            total += sum(cfg.rank * (m.in_features + m.out_features) for m in mats)
    return total


@pytest.mark.parametrize("cfg", [LoRAConfig(), LoRAConfig(rank=4, targets=ALL)])
def test_only_lora_parameters_train_and_their_count(base, cfg) -> None:
    model = copy.deepcopy(base)
    apply_lora(model, cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected_count(base, cfg)


def write_local_dir(model, folder) -> None:
    """The open_clip hub layout the project's export writes: config + safetensors weights."""
    folder.mkdir()
    config = {"model_cfg": open_clip.get_model_config("tiny-clip"), "preprocess_cfg": preprocess_cfg(model)}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )


def test_merged_weights_equal_unmerged_and_load_in_open_clip(base, batch, tmp_path) -> None:
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(targets=ALL))
    train(model, batch, steps=3)
    assert all(b.abs().max() > 0 for n, b in model.named_parameters() if ".lora_B." in n)
    unmerged = embeddings(model, batch)
    merge_lora(model)
    assert set(model.state_dict()) == set(base.state_dict())  # a plain open_clip model again
    for ours, ref in zip(embeddings(model, batch), unmerged):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    write_local_dir(model, tmp_path / "export")
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'export'}").eval()
    for ours, ref in zip(embeddings(loaded, batch), unmerged):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


class Quadratic(torch.nn.Module):
    """L(θ) = ½·mean((Xθ − y)²): gradient and Hessian in closed form for the direct computation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.theta = torch.nn.Parameter(torch.randn(x.shape[1], dtype=x.dtype))

    def loss(self) -> torch.Tensor:
        return 0.5 * ((self.x @ self.theta - self.y) ** 2).mean()


def test_glad_term_matches_the_formula_written_out() -> None:
    torch.manual_seed(3)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    model = Quadratic(x, y)
    cfg = GLADConfig(rho=0.3, weight=0.7)
    theta = model.theta.detach().clone()
    hess, b = x.t() @ x / len(x), x.t() @ y / len(x)
    g = hess @ theta - b
    g_sam = hess @ (theta + cfg.rho * g / g.norm()) - b
    cos = g @ g_sam / (g.norm() * g_sam.norm())
    expected_term = cfg.weight * (1 - cos)
    # d/dθ [L + λ(1 − cos(g(θ), c))] with c = g_sam held constant and dg/dθ = H
    dcos_dg = g_sam / (g.norm() * g_sam.norm()) - cos * g / g.norm() ** 2
    expected_grad = g - cfg.weight * hess @ dcos_dg

    loss, term = glad_objective(model, None, lambda m, _: m.loss(), cfg, params=[model.theta])
    (loss + term).backward()
    torch.testing.assert_close(term.detach(), expected_term)
    torch.testing.assert_close(model.theta.grad, expected_grad)
    assert torch.equal(model.theta.detach(), theta)  # the SAM step is undone exactly


def means(*values: torch.Tensor):
    """Stands in for the mean over ranks that `glad_objective` asks for: `values` in turn (g's, then g_sam's)."""
    found = iter(values)
    return lambda _: next(found)


def test_glad_on_shares_of_a_batch_averages_to_the_whole_batch() -> None:
    """Two ranks' halves of a batch, their ranks' mean (`average`) played by the closed form of the whole
    batch: each half's term is the whole batch's R, and the mean of the halves' gradients (what DDP averages)
    is the whole batch's ∇R, from g and g_sam of the whole batch and the whole batch's Hessian."""
    torch.manual_seed(4)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    cfg = GLADConfig(rho=0.3, weight=0.7)
    theta = torch.randn(5, dtype=torch.float64)
    hess, b = x.t() @ x / len(x), x.t() @ y / len(x)
    g = hess @ theta - b
    g_sam = hess @ (theta + cfg.rho * g / g.norm()) - b
    cos = g @ g_sam / (g.norm() * g_sam.norm())
    expected_grad = -cfg.weight * hess @ (g_sam / (g.norm() * g_sam.norm()) - cos * g / g.norm() ** 2)
    grads = []
    for half in (slice(0, 8), slice(8, 16)):
        model = Quadratic(x[half], y[half])
        model.theta.data.copy_(theta)
        _, term = glad_objective(model, None, lambda m, _: m.loss(), cfg, [model.theta], means(g, g_sam))
        term.backward()
        torch.testing.assert_close(term.detach(), cfg.weight * (1 - cos))
        grads.append(model.theta.grad)
    torch.testing.assert_close((grads[0] + grads[1]) / 2, expected_grad)


def test_glad_update_matches_torch_func_on_a_small_network() -> None:
    """∇θ(L + R) for a two-layer network, against the same objective composed from torch.func transforms:
    g = func.grad(L)(θ), g_sam = func.grad(L)(θ + ρ·g/‖g‖) held constant, then func.grad of L + λ(1 − cos)."""
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, labels = torch.randn(12, 3, dtype=torch.float64), torch.arange(12) % 2
    cfg = GLADConfig(rho=0.2, weight=0.9)
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}

    def loss_at(params: dict) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), labels)

    def flat_grad(params: dict) -> torch.Tensor:
        return torch.cat([v.reshape(-1) for v in torch.func.grad(loss_at)(params).values()])

    g = flat_grad(theta)
    shifted, start = {}, 0
    for name, value in theta.items():
        shifted[name] = value + cfg.rho * g[start : start + value.numel()].view_as(value) / g.norm()
        start += value.numel()
    g_sam = flat_grad(shifted)

    def objective(params: dict) -> torch.Tensor:
        return loss_at(params) + cfg.weight * (1 - F.cosine_similarity(flat_grad(params), g_sam, dim=0))

    expected = torch.func.grad(objective)(theta)
    loss, term = glad_objective(
        net, None, lambda m, _: F.cross_entropy(m(x), labels), cfg, list(net.parameters())
    )
    (loss + term).backward()
    torch.testing.assert_close(term.detach(), objective(theta) - loss_at(theta))
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name])
        assert torch.equal(p.detach(), theta[name])  # the SAM step is undone exactly


@pytest.mark.parametrize("glad", [None, GLADConfig()], ids=["lora", "glad"])
def test_a_few_steps_reduce_the_training_loss(base, batch, glad) -> None:
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig())
    losses = train(model, batch, steps=6, glad=glad)
    with torch.no_grad():
        final = classification_loss(model, batch).item()
    assert final < losses[0] - 0.05, losses + [final]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"rank": 0}, "lora.rank"),
        ({"targets": ("qkv",)}, "lora.targets"),
        ({"towers": "audio"}, "lora.towers"),
    ],
)
def test_bad_lora_config_names_the_field(kwargs, key) -> None:
    with pytest.raises(ValueError, match=key):
        LoRAConfig(**kwargs)


def test_layers_out_of_range_name_the_field(base) -> None:
    with pytest.raises(ValueError, match="lora.layers"):
        apply_lora(copy.deepcopy(base), LoRAConfig(layers=(5,)))


def test_custom_blocks_and_custom_text_tower(batch, tmp_path) -> None:
    """open_clip's own `Attention` (a bare packed in_proj_weight) in a CustomTextCLIP: adapted and merged
    the same way."""
    cfg = json.loads((MODEL_CONFIG_DIR / "tiny-clip.json").read_text())
    cfg["custom_text"] = True
    cfg["vision_cfg"]["block_type"] = cfg["text_cfg"]["block_type"] = "custom"
    (tmp_path / "tiny-clip-custom.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-clip-custom.json")
    torch.manual_seed(0)
    base = open_clip.create_model("tiny-clip-custom").eval().requires_grad_(False)
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(targets=ALL))
    assert isinstance(model.text.transformer.resblocks[0].attn, open_clip.transformer.Attention)
    for ours, theirs in zip(embeddings(model, batch), embeddings(base, batch)):
        assert torch.equal(ours, theirs)
    train(model, batch, steps=2)
    unmerged = embeddings(model, batch)
    merge_lora(model)
    assert set(model.state_dict()) == set(base.state_dict())
    for ours, ref in zip(embeddings(model, batch), unmerged):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
