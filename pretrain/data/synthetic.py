"""Synthetic image-text pairs: global sample `i` is a pure function of (seed, i).

The global batch of optimizer step `s` is samples `[s*G, (s+1)*G)` with `G = batch * world * accum`, and
rank `r` takes its contiguous slice of each micro-batch. Runs that differ only in how that global batch is
split (ranks, accumulation) therefore see the same data, which is what the equivalence tests rely on, and a
checkpoint (global samples read) resumes on any split of the same global batch.
Images and texts share a latent class so that the contrastive loss can actually fall.
"""

from __future__ import annotations

import numpy as np
import torch

from pretrain.config import DataConfig


class SyntheticSource:
    """Deterministic micro-batches for one rank; its position is the micro-batch counter."""

    def __init__(
        self,
        seed: int,
        batch_size: int,
        rank: int,
        world: int,
        image_size: int,
        context_length: int,
        vocab_size: int = 49408,
        classes: int = DataConfig.synthetic_classes,
    ) -> None:
        self.seed, self.batch_size, self.rank, self.world = seed, batch_size, rank, world
        self.image_size, self.context_length, self.vocab_size = image_size, context_length, vocab_size
        self.micro_batches = 0
        rng = np.random.default_rng([seed, 0xC1A55])
        self.class_images = rng.standard_normal((classes, 3, image_size, image_size)).astype(np.float32)
        # Captions end with the largest token id: open_clip pools the text at the argmax (EOT) position.
        self.class_texts = rng.integers(1, vocab_size - 1, (classes, min(8, context_length - 1)))

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global sample `index`: a noisy class image and its class caption."""
        rng = np.random.default_rng([self.seed, index])
        c = int(rng.integers(len(self.class_images)))
        image = self.class_images[c] + rng.standard_normal(self.class_images.shape[1:], dtype=np.float32)
        text = np.zeros(self.context_length, dtype=np.int64)
        n = self.class_texts.shape[1]
        text[:n] = self.class_texts[c]
        text[n] = self.vocab_size - 1
        return torch.from_numpy(image), torch.from_numpy(text)

    def indices(self, micro_batch: int) -> range:
        """Global sample indices of this rank's share of micro-batch number `micro_batch`."""
        start = micro_batch * self.batch_size * self.world + self.rank * self.batch_size
        return range(start, start + self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts = zip(*(self.sample(i) for i in self.indices(self.micro_batches)))
        self.micro_batches += 1
        return torch.stack(images), torch.stack(texts)

    def state_dict(self) -> dict:
        """Global samples read: the same on every rank."""
        return {"kind": "synthetic", "samples": self.micro_batches * self.batch_size * self.world}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Every rank's state (a list, as a checkpoint gathers it) or one rank's; one written by an older
        version counts micro-batches of the same split."""
        state = state[0] if isinstance(state, list) else state
        if state.get("kind") != "synthetic":
            raise ValueError(f"checkpoint data state is {state.get('kind')!r}, this run reads synthetic data")
        samples = (
            state["samples"] if "samples" in state else state["micro_batches"] * self.batch_size * self.world
        )
        if samples % (self.batch_size * self.world):
            raise ValueError(
                f"the checkpoint read {samples} synthetic samples, not whole micro-batches of this run's "
                f"{self.batch_size} x {self.world} ranks"
            )
        self.micro_batches = samples // (self.batch_size * self.world)

    def close(self) -> None:
        pass
