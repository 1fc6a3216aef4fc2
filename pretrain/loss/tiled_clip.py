"""O(B)-memory InfoNCE: log-sum-exps over column blocks in forward, blocks recomputed in backward.

`ClipLoss(chunk_size=...)` computes this rank's loss as
`(sum_i LSE_j(s img_i . txt_j) + sum_i LSE_j(s txt_i . img_j) - 2 s sum_i img_i . txt_i) / 2n`
over its n local rows and the N columns of all ranks, in a custom autograd Function that saves only the
inputs and two vectors of n log-sum-exps: no `n x N` matrix is ever stored, at most a few `chunk x chunk`
blocks exist at once (`pretrain.loss.blocks`), and backward writes straight into the feature gradients.

The columns come in per-rank sources: all-gathered with gradients (then used slice by slice), or, with
`ring=True`, passed peer-to-peer around the ring so that only one other rank's block is held at a time; in
backward the blocks go around again, each carrying the gradient the ranks it visits add for it, and the last
hop brings that gradient home. The source of this rank's own rows (the one holding the positives) is scored
once for both directions: its row log-sum-exps serve image->text and its column ones text->image.
"""

from __future__ import annotations

import torch

from pretrain.loss.blocks import accumulation_dtype, block_lse, block_lse_grads
from pretrain.loss.ring import pass_right
from pretrain.parallel.distributed import all_gather_with_grad, world


class _Blocks:
    """This rank's rows, their running log-sum-exps and gradients, and how one column source adds to them."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, chunk: int) -> None:
        self.img, self.txt, self.scale, self.chunk = img, txt, scale.detach(), chunk
        self.rank = world()[0]
        self.dtype = accumulation_dtype(img)
        self.lse_img = img.new_full((img.shape[0],), -torch.inf, dtype=self.dtype)
        self.lse_txt = img.new_full((img.shape[0],), -torch.inf, dtype=self.dtype)

    def forward_source(self, source: int, img: torch.Tensor, txt: torch.Tensor) -> None:
        """Merge the log-sum-exps of this rank's rows against `source`'s columns."""
        if source == self.rank:
            rows, cols = block_lse(self.img, self.txt, self.scale, self.chunk, columns=True)
        else:
            rows, _ = block_lse(self.img, txt, self.scale, self.chunk)
            cols, _ = block_lse(self.txt, img, self.scale, self.chunk)
        self.lse_img = torch.logaddexp(self.lse_img, rows)
        self.lse_txt = torch.logaddexp(self.lse_txt, cols)

    def positives(self) -> torch.Tensor:
        """sum_i img_i . txt_i, row tile by row tile (no feature-sized temporary)."""
        total = torch.zeros((), dtype=self.dtype, device=self.img.device)
        for start in range(0, self.img.shape[0], self.chunk):
            rows = slice(start, start + self.chunk)
            total += (self.img[rows] * self.txt[rows]).sum(dtype=self.dtype)
        return total

    def value(self) -> torch.Tensor:
        """The summed loss of both directions over this rank's rows."""
        return self.lse_img.sum() + self.lse_txt.sum() - 2 * self.scale.to(self.dtype) * self.positives()

    def start_backward(self, saved_lse: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor) -> None:
        """Begin the gradients of `weight` x `value()`: the positives' share, then sources add theirs."""
        self.lse_img, self.lse_txt = saved_lse
        self.weight = weight.to(self.dtype)
        factor = -2 * self.weight * self.scale.to(self.dtype)
        self.grad_img = self.txt.to(self.dtype) * factor
        self.grad_txt = self.img.to(self.dtype) * factor
        self.grad_scale = -2 * self.weight * self.positives()

    def backward_source(
        self,
        source: int,
        img: torch.Tensor,
        txt: torch.Tensor,
        remote: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Add `source`'s share of the gradients of this rank's rows and the scale, and of `source`'s
        columns into `remote` = (d img, d txt) of that source (None for this rank's own source)."""
        if source == self.rank:
            lse, grads = (self.lse_img, self.lse_txt), (self.grad_img, self.grad_txt)
            self.grad_scale += block_lse_grads(
                self.img, self.txt, self.scale, self.chunk, lse, self.weight, grads
            )
            return
        grads = (self.grad_img, remote[1])
        self.grad_scale += block_lse_grads(
            self.img, txt, self.scale, self.chunk, (self.lse_img, None), self.weight, grads
        )
        grads = (self.grad_txt, remote[0])
        self.grad_scale += block_lse_grads(
            self.txt, img, self.scale, self.chunk, (self.lse_txt, None), self.weight, grads
        )

    def local_grads(self, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img, txt = self.grad_img.to(self.img.dtype), self.grad_txt.to(self.txt.dtype)
        return img, txt, self.grad_scale.to(scale.dtype).reshape(scale.shape)


class _GatheredLoss(torch.autograd.Function):
    """This rank's summed loss against the all-gathered columns, taken slice by slice."""

    @staticmethod
    def forward(ctx, img, txt, all_img, all_txt, scale, chunk: int):
        blocks = _Blocks(img, txt, scale, chunk)
        for source, (img_k, txt_k) in enumerate(
            zip(all_img.split(img.shape[0]), all_txt.split(img.shape[0]))
        ):
            blocks.forward_source(source, img_k, txt_k)
        ctx.save_for_backward(img, txt, all_img, all_txt, scale, blocks.lse_img, blocks.lse_txt)
        ctx.chunk = chunk
        return blocks.value()

    @staticmethod
    def backward(ctx, grad):
        img, txt, all_img, all_txt, scale, *saved_lse = ctx.saved_tensors
        blocks = _Blocks(img, txt, scale, ctx.chunk)
        blocks.start_backward(saved_lse, grad)
        n, gathered = img.shape[0], all_img.shape[0] != img.shape[0]
        grad_all_img = torch.zeros_like(all_img, dtype=blocks.dtype) if gathered else None
        grad_all_txt = torch.zeros_like(all_txt, dtype=blocks.dtype) if gathered else None
        for source, (img_k, txt_k) in enumerate(zip(all_img.split(n), all_txt.split(n))):
            remote = None
            if source != blocks.rank:
                remote = (
                    grad_all_img[source * n : (source + 1) * n],
                    grad_all_txt[source * n : (source + 1) * n],
                )
            blocks.backward_source(source, img_k, txt_k, remote)
        if gathered:
            grad_all_img, grad_all_txt = grad_all_img.to(all_img.dtype), grad_all_txt.to(all_txt.dtype)
        grad_img, grad_txt, grad_scale = blocks.local_grads(scale)
        return grad_img, grad_txt, grad_all_img, grad_all_txt, grad_scale, None


class _RingLoss(torch.autograd.Function):
    """This rank's summed loss, the other ranks' (img, txt) blocks arriving around the ring.

    Forward: W-1 hops of the features. Backward: the features go around again with a gradient accumulator
    that each rank they visit adds to; one last hop takes the accumulator back to the rank that owns them.
    """

    @staticmethod
    def forward(ctx, img, txt, scale, chunk: int):
        rank, size = world()
        blocks = _Blocks(img, txt, scale, chunk)
        held = torch.cat([img, txt])
        for step in range(size):
            blocks.forward_source((rank - step) % size, *held.chunk(2))
            if step < size - 1:
                held = pass_right(held)
        ctx.save_for_backward(img, txt, scale, blocks.lse_img, blocks.lse_txt)
        ctx.chunk = chunk
        return blocks.value()

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale, *saved_lse = ctx.saved_tensors
        rank, size = world()
        blocks = _Blocks(img, txt, scale, ctx.chunk)
        blocks.start_backward(saved_lse, grad)
        blocks.backward_source(rank, img, txt, None)
        held = torch.cat([img, txt])
        carried = torch.zeros(held.shape, dtype=blocks.dtype, device=held.device)
        for step in range(1, size):
            held, carried = pass_right(held), pass_right(carried)
            blocks.backward_source((rank - step) % size, *held.chunk(2), carried.chunk(2))
        carried = pass_right(carried)  # home: the gradient every other rank computed for this rank's rows
        blocks.grad_img += carried[: img.shape[0]]
        blocks.grad_txt += carried[img.shape[0] :]
        return *blocks.local_grads(scale), None


def tiled_loss_sum(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, chunk: int, ring: bool
) -> torch.Tensor:
    """This rank's InfoNCE summed over both directions and its rows, against all ranks' columns, with
    gradients to the local features, the scale and (through the gather or the ring) other ranks'."""
    if world()[1] == 1:
        return _GatheredLoss.apply(img, txt, img, txt, scale, chunk)
    if ring:
        return _RingLoss.apply(img, txt, scale, chunk)
    return _GatheredLoss.apply(img, txt, all_gather_with_grad(img), all_gather_with_grad(txt), scale, chunk)
