"""SigLIP's pairwise sigmoid loss, with other ranks' texts passed peer-to-peer around the ring.

Every (image, text) pair is its own binary decision: the matching pair is a positive, every other pair a
negative, scored by `logsigmoid(label * (scale * img @ txt.T + bias))` (open_clip's `SigLipLoss`).

With W ranks, each rank first scores its images against its own texts (the block holding the positives),
then W-1 times passes the text block it holds to its right neighbour and takes one from its left, scoring
each arriving block as negatives. The next hop's transfer is started before the current block is scored, so
communication overlaps compute where the backend runs P2P asynchronously (NCCL; gloo too). Gradients of a
received block travel back along the ring to the rank that owns those texts, each return started before
this rank scores the block backward and waited for after, so backward overlaps too. Logits are computed one
`B x B` block at a time and the `N x N` global matrix never exists; autograd keeps each block's
activations (`B x N` in all) unless `chunk_size` scores each block in `chunk x chunk` pieces that a custom
autograd Function recomputes in backward (nothing but the inputs saved).

Normalisation (open_clip's): each rank divides by its local batch `B`, so
`loss_r = -sum(logsigmoid over its B x N pairs) / B`. The mean of `loss_r` over ranks is the full-batch loss
`-sum(over N x N) / N`, and since each rank's feature gradients sum every rank's contribution, DDP's
averaging of parameter gradients gives exactly the full-batch gradient: W ranks x B train like 1 x W*B,
as with `ClipLoss`. All ranks must use the same local batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.loss.blocks import accumulation_dtype, spans
from pretrain.loss.ring import exchange, ring_peers
from pretrain.loss.tiling import ChunkedLoss
from pretrain.parallel.distributed import world


class _Hop:
    """One hop of a text block around the ring, both ways.

    Forward: this rank's block goes right while the left neighbour's arrives. Backward, in reverse: the
    arrived block's gradient goes back left while, from the right, comes the gradient the other ranks
    computed for the block this rank sent. Each direction is started early and waited for late, so the
    transfer overlaps the scoring of a block (forward) and its gradient (backward).
    """

    def __init__(self, texts: torch.Tensor) -> None:
        self.left, self.right = ring_peers()
        self.sent = texts.detach().contiguous()  # alive until the send completes
        self.arrived, self.works = exchange(self.sent, send_to=self.right, recv_from=self.left)
        self.grad_sent: torch.Tensor | None = None

    def wait_arrival(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.arrived

    def start_return(self, grad: torch.Tensor) -> None:
        self.grad_sent = grad.contiguous()
        self.returned, self.works = exchange(self.grad_sent, send_to=self.left, recv_from=self.right)

    def wait_return(self) -> torch.Tensor:
        if self.grad_sent is None:
            raise RuntimeError("SigLipLoss ring: backward of a hop ran before its gradient was sent")
        for work in self.works:
            work.wait()
        return self.returned


class _Departure(torch.autograd.Function):
    """Identity on the block this rank sends; its backward adds the gradient that comes back for it.

    Autograd runs this after the block has been scored backward here, so that compute overlaps the return.
    """

    @staticmethod
    def forward(ctx, texts: torch.Tensor, hop: _Hop) -> torch.Tensor:
        ctx.hop = hop
        return texts.view_as(texts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad + ctx.hop.wait_return(), None


class _Arrival(torch.autograd.Function):
    """The block arrived from the left neighbour; its backward starts that block's gradient on its way back.

    `departed` (the `_Departure` output) only ties the two in the graph: its gradient comes over the network
    and is added in `_Departure.backward`.
    """

    @staticmethod
    def forward(ctx, departed: torch.Tensor, hop: _Hop) -> torch.Tensor:
        ctx.hop = hop
        return hop.wait_arrival()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:
        ctx.hop.start_return(grad)
        return None, None


def _pair_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    first_positive: int | None,
) -> torch.Tensor:
    """Summed `-logsigmoid(label * logit)` over all pairs of `img` rows and `txt` rows.

    Labels are -1 except +1 at (i, first_positive + i); `first_positive=None` marks a negatives-only block.
    The sum is taken in fp32 at least: in bf16 a sum of B x N terms would keep only ~3 significant digits.
    """
    logits = scale * img @ txt.T + bias
    labels = -torch.ones_like(logits)
    if first_positive is not None:
        rows = torch.arange(img.shape[0], device=img.device)
        labels[rows, rows + first_positive] = 1.0
    return -F.logsigmoid(labels * logits).sum(dtype=accumulation_dtype(logits))


def _signs(rows: slice, cols: slice, shape: torch.Size, first_positive: int | None, like: torch.Tensor):
    """Labels of one block: -1, and +1 where text column = image row + `first_positive`."""
    signs = torch.full(shape, -1.0, dtype=like.dtype, device=like.device)
    if first_positive is not None:
        start = max(rows.start, cols.start - first_positive)
        stop = min(rows.start + shape[0], cols.start + shape[1] - first_positive)
        if start < stop:
            r = torch.arange(start, stop, device=like.device)
            signs[r - rows.start, r + first_positive - cols.start] = 1.0
    return signs


class _BlockedPairLoss(torch.autograd.Function):
    """`_pair_loss` over `chunk x chunk` blocks: nothing but the inputs is saved, and backward recomputes
    each block's logits to add its share of the gradients (d logit = -label x sigmoid(-label x logit))."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, first_positive: int | None, chunk: int):
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.first_positive, ctx.chunk = first_positive, chunk
        total = torch.zeros((), dtype=accumulation_dtype(img), device=img.device)
        for _, _, logits, signs in _blocks(img, txt, scale, bias, first_positive, chunk):
            total -= F.logsigmoid(signs * logits).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale, bias = ctx.saved_tensors
        dtype = accumulation_dtype(img)
        grad_img = torch.zeros(img.shape, dtype=dtype, device=img.device)
        grad_txt, grad_scale = (
            torch.zeros(txt.shape, dtype=dtype, device=img.device),
            grad.new_zeros((), dtype=dtype),
        )
        grad_bias = torch.zeros((), dtype=dtype, device=img.device)
        blocks = _blocks(img, txt, scale, bias, ctx.first_positive, ctx.chunk)
        for i, j, logits, signs in blocks:
            dlogits = (-signs * torch.sigmoid(-signs * logits) * grad).to(img.dtype)
            grad_bias += dlogits.sum(dtype=dtype)
            d_img = dlogits @ txt[j]  # d loss / d (img . txt) = scale x dlogits
            grad_scale += (img[i] * d_img).sum(dtype=dtype)
            grad_img[i] += d_img * scale
            grad_txt[j] += (dlogits.T @ img[i]) * scale
        return (
            grad_img.to(img.dtype),
            grad_txt.to(txt.dtype),
            grad_scale.to(scale.dtype).reshape(scale.shape),
            grad_bias.to(bias.dtype).reshape(bias.shape),
            None,
            None,
        )


def _blocks(img, txt, scale, bias, first_positive, chunk):
    """(row slice, column slice, logits in the accumulation dtype, labels) of every `chunk x chunk` block."""
    dtype = accumulation_dtype(img)
    for i in spans(img.shape[0], chunk):
        for j in spans(txt.shape[0], chunk):  # scaled after the matmul, in fp32: bf16 would round twice
            logits = (img[i] @ txt[j].T).to(dtype) * scale.to(dtype) + bias.to(dtype)
            yield i, j, logits, _signs(i, j, logits.shape, first_positive, logits)


class SigLipLoss(ChunkedLoss):
    """Pairwise sigmoid loss over the global batch, negatives exchanged around the ring of ranks.

    `chunk_size` scores every ring block in `chunk_size x chunk_size` pieces inside a custom autograd
    Function that saves only its inputs and recomputes each piece in backward: no `B x B` logits are kept.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        """The loss of this rank's images against every rank's texts, divided by the local batch size."""
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(
                f"SigLipLoss needs as many texts as images, got {text_features.shape[0]} "
                f"texts for {image_features.shape[0]} images"
            )
        _, size = world()
        texts, total = text_features, image_features.new_zeros((), dtype=accumulation_dtype(image_features))
        for step in range(size):
            hop = None
            if step < size - 1:  # pass this block on before scoring it: the transfer overlaps the compute
                hop = _Hop(texts)
                texts = _Departure.apply(texts, hop)
            total = total + self._block(image_features, texts, logit_scale, logit_bias, positives=step == 0)
            if hop is not None:
                texts = _Arrival.apply(texts, hop)
        return total / image_features.shape[0]

    def _block(self, img, txt, scale, bias, positives: bool) -> torch.Tensor:
        """Summed pair losses of local images against one text block, in `chunk_size` blocks if set."""
        first_positive = 0 if positives else None
        if self.chunk_size is None:
            return _pair_loss(img, txt, scale, bias, first_positive)
        return _BlockedPairLoss.apply(img, txt, scale, bias, first_positive, self.chunk_size)
