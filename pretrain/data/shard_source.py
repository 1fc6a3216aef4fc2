"""A simple in-order reader of local img2dataset shards, cycling as many epochs as training needs.

Every rank reads the same global stream and keeps its contiguous slice of each micro-batch (the same split
as synthetic data), so its position is one number: samples consumed from the global stream. Enough for the
demo and small runs; the streaming WebDataset pipeline is the path for real datasets.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch
from PIL import Image

from data_tools.shards import iter_shard
from pretrain.data.spec import expand_urls

log = logging.getLogger("pretrain")


def local_shards(spec: str) -> list[Path]:
    """The shard paths of a local spec; a missing shard is an error that names it."""
    paths = [Path(u) for u in expand_urls(spec)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]} ({len(missing)} of {len(paths)} missing)")
    return paths


class ShardSource:
    """Micro-batches of (image, tokens) for one rank from an in-order cycle over shards."""

    def __init__(
        self,
        spec: str,
        batch_size: int,
        rank: int,
        world_size: int,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
    ) -> None:
        self.shards = local_shards(spec)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.samples = 0
        self.skipped = 0
        self._stream = self._cycle()

    def _cycle(self) -> Iterator[dict]:
        while True:
            seen = 0
            for shard in self.shards:
                for sample in iter_shard(shard):
                    seen += 1
                    yield sample
            if seen == 0:
                raise RuntimeError(f"no samples in {len(self.shards)} shards starting with {self.shards[0]}")

    def _decode(self, sample: dict) -> tuple[torch.Tensor, str] | None:
        try:
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            return self.preprocess(image), str(sample["txt"])
        except (KeyError, OSError, ValueError) as e:
            self.skipped += 1
            log.warning("skipping sample %s: %s", sample.get("__key__"), e)
            return None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.batch_size * self.world_size
        window = list(islice(self._stream, chunk))
        self.samples += chunk
        mine = window[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        decoded = [d for d in map(self._decode, mine) if d is not None]
        if not decoded:
            return self.next_batch()
        images, captions = zip(*decoded)
        return torch.stack(images), self.tokenizer(list(captions))

    def state_dict(self) -> dict:
        return {"kind": "shards", "samples": self.samples, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Skip the samples consumed before the checkpoint (tar reading only, no decoding)."""
        self._stream = self._cycle()
        self.samples, self.skipped = int(state["samples"]), int(state.get("skipped", 0))
        for _ in islice(self._stream, self.samples):
            pass

    def close(self) -> None:
        pass
