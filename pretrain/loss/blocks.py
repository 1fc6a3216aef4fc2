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


def spans(n: int, chunk: int) -> list[slice]:
    """The slices of `n` rows, `chunk` at a time (the last one shorter)."""
    return [slice(start, start + chunk) for start in range(0, n, chunk)]


def _logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale * a @ b.T` with the matmul in the inputs' dtype and the scaling in `dtype` (fp32 at least:
    scaling bf16 features first would round them a second time)."""
    return (a @ b.T).to(dtype).mul_(scale.to(dtype))


def block_lse(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, chunk: int, columns: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row log-sum-exps of `scale * a @ b.T` (length len(a)) and, with `columns`, its column log-sum-exps
    (length len(b)), from the same blocks. No block outlives its step."""
    dtype = accumulation_dtype(a)
    rows = a.new_full((a.shape[0],), -torch.inf, dtype=dtype)
    cols = a.new_full((b.shape[0],), -torch.inf, dtype=dtype) if columns else None
    for i in spans(a.shape[0], chunk):
        for j in spans(b.shape[0], chunk):
            logits = _logits(a[i], b[j], scale, dtype)
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

    With P the row softmax (+ column softmax) of the logits, recomputed block by block, and w = `weight`:
    d a = w scale P b, d b = w scale P.T a and d scale = w sum(P * a @ b.T) = w sum(a * P b), the last per
    row tile from `P b` so that no block needs a further pass. The matmuls run in the inputs' dtype (bf16
    on tensor cores), softmax and sums in fp32 at least. Writing into the caller's accumulators keeps the
    feature-sized buffers to the gradients themselves.
    """
    (row_lse, col_lse), (grad_a, grad_b) = lse, grads
    dtype = grad_a.dtype
    grad_scale = torch.zeros((), dtype=dtype, device=a.device)
    coef = scale.to(dtype) * weight  # d loss / d (a . b) = scale x d loss / d logit
    for i in spans(a.shape[0], chunk):
        a_coef = (a[i].to(dtype) * coef).to(a.dtype)
        prob_b = torch.zeros(a[i].shape, dtype=dtype, device=a.device)  # sum over blocks of P b
        for j in spans(b.shape[0], chunk):
            logits = _logits(a[i], b[j], scale, dtype)  # the forward's logits, recomputed
            probs = _probs(logits, row_lse[i], None if col_lse is None else col_lse[j]).to(a.dtype)
            prob_b += probs @ b[j]
            grad_b[j] += probs.T @ a_coef
        grad_a[i] += prob_b * coef
        grad_scale += weight * (a[i] * prob_b).sum(dtype=dtype)
    return grad_scale


def _probs(logits: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor | None) -> torch.Tensor:
    """Row softmax (+ column softmax) of a block of logits from the saved log-sum-exps, in place."""
    col_probs = None if col_lse is None else torch.exp(logits - col_lse[None, :])
    probs = logits.sub_(row_lse[:, None]).exp_()
    return probs if col_probs is None else probs.add_(col_probs)
