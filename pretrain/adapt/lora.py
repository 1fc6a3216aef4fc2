"""LoRA (Hu et al. 2021) on the towers of an open_clip model, and merging it back into plain weights.

Each adapted weight W (out × in) becomes W + (alpha / r) · B·A with A (r × in) trainable and B (out × r)
starting at zero, so an adapted model with untrained adapters computes exactly what the base model does.
The default setting is CLIP-LoRA's (Zanella & Ben Ayed 2024), which GLAD (arXiv 2507.13089) follows: r = 2,
alpha = 1, dropout 0.25 on the query, key and value projections of every block of both encoders.

Own code, not peft: open_clip's blocks keep q/k/v packed in one `in_proj_weight` parameter (of
`nn.MultiheadAttention`, or a bare `nn.Parameter` in open_clip's own `Attention`), which peft's LoRA layers
cannot target per projection (its `MultiheadAttention` layer adapts the packed matrix as one and merges and
unmerges around every forward), and `nn.MultiheadAttention` never calls its `out_proj` module, so a peft LoRA
on `out_proj` would be silently ignored. One `torch.nn.utils.parametrize` parametrization covers every case:
the block's own forward reads the adapted weight, and merging removes the parametrization leaving the folded
weight under the original state-dict key (a plain open_clip model, loadable with `local-dir:`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

TOWERS = ("image", "text", "both")
TARGETS = ("q", "k", "v", "out", "mlp")
QKV = {"q": 0, "k": 1, "v": 2}  # row block of the packed in_proj_weight


@dataclass
class LoRAConfig:
    """Where LoRA goes and its size; defaults are CLIP-LoRA's setting, used by GLAD."""

    rank: int = 2
    """r: the rank of each update B·A."""
    alpha: float = 1.0
    """The update is scaled by alpha / rank (Hu et al.)."""
    dropout: float = 0.25
    """Dropout on the LoRA path's input features, in training only. Applied to A's input columns (one mask
    per forward pass, shared by all tokens), because the update acts on the weight; 0 turns it off."""
    targets: tuple[str, ...] = ("q", "k", "v")
    """Which matrices of every block: q, k, v (rows of the packed in-projection), out (attention output
    projection), mlp (both MLP layers, c_fc and c_proj)."""
    towers: str = "both"
    """image, text or both encoders."""
    layers: tuple[int, ...] | None = None
    """Block indices to adapt (negative counts from the end); None: all blocks."""

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if self.rank < 1:
            raise ValueError(f"lora.rank: must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha: must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets: {unknown or 'empty'}; choose from {', '.join(TARGETS)}")
        if self.towers not in TOWERS:
            raise ValueError(f"lora.towers: {self.towers!r}; choose from {', '.join(TOWERS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAUpdate(nn.Module):
    """A parametrization W ↦ W + scale · B·A, with one (A, B) pair per adapted row block of W.

    `blocks` are (start, stop) row ranges: the whole matrix for a linear layer, or the q/k/v thirds of a
    packed in-projection, each with its own low-rank update (CLIP-LoRA adapts q, k and v separately).
    """

    def __init__(self, weight: torch.Tensor, blocks: list[tuple[int, int]], cfg: LoRAConfig) -> None:
        super().__init__()
        n_in = weight.shape[1]
        self.blocks = sorted(blocks)
        self.scale = cfg.scale
        self.dropout = cfg.dropout
        self.generator: torch.Generator | None = None
        """Draws the dropout masks when set (a CPU generator: a training loop's seeded per-step randomness);
        torch's global generator otherwise."""
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(cfg.rank, n_in, **kw)) for _ in self.blocks])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(stop - start, cfg.rank, **kw)) for start, stop in self.blocks]
        )
        for a in self.lora_A:  # Hu et al.'s (and loralib's) init: A like a linear layer's weight, B zero
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self, n_rows: int) -> torch.Tensor:
        """The full-size update scale · B·A (zero rows where no block is adapted)."""
        a0 = self.lora_A[0]
        mask = None
        if self.training and self.dropout > 0:
            keep = torch.full((a0.shape[1],), 1 - self.dropout, dtype=a0.dtype)
            mask = torch.bernoulli(keep, generator=self.generator).to(a0.device) / (1 - self.dropout)
        rows, pos = [], 0
        for (start, stop), a, b in zip(self.blocks, self.lora_A, self.lora_B):
            if start > pos:
                rows.append(a.new_zeros(start - pos, a.shape[1]))
            rows.append(b @ (a if mask is None else a * mask))
            pos = stop
        if pos < n_rows:
            rows.append(a0.new_zeros(n_rows - pos, a0.shape[1]))
        return self.scale * torch.cat(rows)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta(weight.shape[0])


def tower_blocks(model: nn.Module, tower: str) -> list[nn.Module]:
    """The residual attention blocks of one tower of an open_clip CLIP / CustomTextCLIP / CoCa model."""
    if tower == "image":
        owner = model.visual
    else:
        owner = model.text if hasattr(model, "text") else model
    transformer = getattr(owner, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise ValueError(f"lora.towers: the {tower} tower ({type(owner).__name__}) has no transformer blocks")
    return list(blocks)


def block_targets(block: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, list]]:
    """(module, parameter name, row blocks) for each matrix of one block that `targets` adapts."""
    out = []
    qkv = [QKV[t] for t in targets if t in QKV]
    if qkv:
        width = block.attn.in_proj_weight.shape[1]
        out.append((block.attn, "in_proj_weight", [(i * width, (i + 1) * width) for i in qkv]))
    linears = ([block.attn.out_proj] if "out" in targets else []) + (
        [block.mlp.c_fc, block.mlp.c_proj] if "mlp" in targets else []
    )
    out += [(m, "weight", [(0, m.weight.shape[0])]) for m in linears]
    return out


def selected(blocks: list[nn.Module], layers: tuple[int, ...] | None) -> list[nn.Module]:
    if layers is None:
        return blocks
    bad = [i for i in layers if not -len(blocks) <= i < len(blocks)]
    if bad:
        raise ValueError(f"lora.layers: {bad} out of range for a tower of {len(blocks)} blocks")
    return [blocks[i] for i in sorted({i % len(blocks) for i in layers})]


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[nn.Parameter]:
    """Add LoRA updates to `model` in place, freeze everything else; returns the trainable LoRA parameters.

    The model's forward is unchanged in form (its blocks read the adapted weights), so it trains, evaluates
    and distributes like any open_clip model.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    towers = ("image", "text") if cfg.towers == "both" else (cfg.towers,)
    for tower in towers:
        for block in selected(tower_blocks(model, tower), cfg.layers):
            for module, name, rows in block_targets(block, cfg.targets):
                weight = getattr(module, name)
                parametrize.register_parametrization(module, name, LoRAUpdate(weight.detach(), rows, cfg))
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def lora_updates(model: nn.Module) -> list[tuple[nn.Module, str, LoRAUpdate]]:
    """Every (module, parameter name, LoRAUpdate) in `model`."""
    found = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            found += [(module, name, p) for p in plist if isinstance(p, LoRAUpdate)]
    return found


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B matrices of every LoRA update, in module order (the trainable parameters)."""
    params = []
    for _, _, update in lora_updates(model):
        params += [*update.lora_A, *update.lora_B]
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA entries of the model's state dict (what a checkpoint of an adaptation run needs)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold scale · B·A into the base weights and remove the adapters, in place; returns the model, now a
    plain open_clip model whose state dict has the base model's keys (export it like any other)."""
    for module, name, update in lora_updates(model):
        update.eval()  # no dropout mask in the folded weight
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def count_lora_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in lora_parameters(model))


__all__ = [
    "LoRAConfig",
    "LoRAUpdate",
    "apply_lora",
    "count_lora_parameters",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
]
