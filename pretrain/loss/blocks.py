"""Log-sum-exp of `scale * a @ b.T` one `chunk x chunk` block at a time, and its gradients.

The engine of the O(B)-memory InfoNCE (`pretrain.loss.tiled_clip`): forward keeps a running log-sum-exp per
row (and per column) across blocks, so only vectors of length `len(a)` and `len(b)` outlive a block;
backward recomputes each block's logits from the inputs and the saved log-sum-exps and adds its share of the
gradients. Sums are kept in fp32 at least (bf16 logits would otherwise lose the small softmax terms).
"""

from __future__ import annotations

import torch


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32, or the tensor's dtype when wider (fp64 stays fp64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _spans(n: int, chunk: int) -> list[slice]:
    return [slice(start, start + chunk) for start in range(0, n, chunk)]


def _block_logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw dot products, scaled logits) of one block, in the accumulation dtype."""
    raw = (a @ b.T).to(accumulation_dtype(a))
    return raw, scale.to(raw.dtype) * raw


def block_lse(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, chunk: int, columns: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row log-sum-exps of `scale * a @ b.T` (length len(a)) and, with `columns`, its column log-sum-exps
    (length len(b)), from the same blocks. No block outlives its step."""
    dtype = accumulation_dtype(a)
    rows = a.new_full((a.shape[0],), -torch.inf, dtype=dtype)
    cols = a.new_full((b.shape[0],), -torch.inf, dtype=dtype) if columns else None
    for i in _spans(a.shape[0], chunk):
        for j in _spans(b.shape[0], chunk):
            _, logits = _block_logits(a[i], b[j], scale)
            rows[i] = torch.logaddexp(rows[i], logits.logsumexp(dim=1))
            if cols is not None:
                cols[j] = torch.logaddexp(cols[j], logits.logsumexp(dim=0))
    return rows, cols


def block_lse_grads(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    chunk: int,
    lse: tuple[torch.Tensor, torch.Tensor | None],
    weight: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Add to `grads` = (d a, d b) the gradients of `weight` x (sum of the row log-sum-exps `lse[0]` + sum
    of the column log-sum-exps `lse[1]` when given) of `scale * a @ b.T`; return the gradient of `scale`.

    d logit_ij = weight x (softmax over row i + softmax over column j), recomputed block by block. Writing
    into the caller's accumulators keeps the feature-sized buffers to the gradients themselves.
    """
    (row_lse, col_lse), (grad_a, grad_b) = lse, grads
    dtype = grad_a.dtype
    grad_scale = torch.zeros((), dtype=dtype, device=a.device)
    scale = scale.to(dtype)
    for i in _spans(a.shape[0], chunk):
        for j in _spans(b.shape[0], chunk):
            raw, logits = _block_logits(a[i], b[j], scale)
            probs = torch.exp(logits - row_lse[i, None])
            if col_lse is not None:
                probs += torch.exp(logits - col_lse[None, j])
            probs *= weight
            grad_scale += (probs * raw).sum()
            probs *= scale  # d loss / d raw dot product
            grad_a[i] += probs @ b[j].to(dtype)
            grad_b[j] += probs.T @ a[i].to(dtype)
    return grad_scale
