"""Which shard each stream partition reads n-th: a pure function of (seed, partition, partitions, n).

A *slot* here is one canonical partition of the stream (`pretrain.data.stream`): a training run has
`data.partitions` of them whatever its ranks and workers, an eval pass one per loader slot (`rank * workers +
worker`). Because the shard sequence of a slot is computed, not drawn from a running RNG, a reader can restart at any position without replaying
what came before, which is what makes mid-epoch resume exact and cheap.

- `resampled`: every shard is drawn with replacement, the source by `data.train_weights`, then a shard of
  that source uniformly (the LAION-5B recipe). Infinite.
- `epoch`: all shards of all sources, shuffled per epoch by (seed, epoch) and dealt round-robin to slots,
  so one epoch reads every shard exactly once across all partitions. Cycles epochs.
- `eval`: the shards in order, dealt round-robin to slots; one pass, no shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from webshards.spec import expand_sources

MODES = ("resampled", "epoch", "eval")


def source_weights(spec: str, weights: list[float] | None, factors: list[float] | None) -> list[float] | None:
    """The weight of each `::` source of `spec`: `data.train_weights`, or from open_clip's upsampling factors
    (`data.train_upsampling_factors`), which weigh every shard of a source, so a source weighs its factor
    times its shard count. None: every source weighs the same."""
    if factors is None:
        return weights
    counts = [len(urls) for urls in expand_sources(spec)]
    if len(factors) != len(counts):
        raise ValueError(
            f"data.train_upsampling_factors has {len(factors)} values for {len(counts)} sources in {spec!r}"
        )
    return [float(f) * n for f, n in zip(factors, counts)]


@dataclass(frozen=True)
class ShardPlan:
    sources: tuple[tuple[str, ...], ...]
    """Shard URLs per source."""
    weights: tuple[float, ...]
    mode: str
    seed: int
    slot: int
    slots: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data.sampling must be one of {MODES}, got {self.mode!r}")
        if (
            self.mode == "epoch" and self.total < self.slots
        ):  # an eval slot without shards just has nothing to do
            raise ValueError(
                f"{self.total} shards cannot feed {self.slots} stream partitions in {self.mode} mode (each reads "
                "whole shards): use fewer data.partitions (or ranks x workers), more shards, or data.sampling=resampled"
            )

    @property
    def total(self) -> int:
        return sum(len(s) for s in self.sources)

    @property
    def per_epoch(self) -> int:
        """Shards this slot reads per epoch (slots differ by at most one)."""
        return len(range(self.slot, self.total, self.slots))

    def _flat(self, index: int) -> str:
        for urls in self.sources:
            if index < len(urls):
                return urls[index]
            index -= len(urls)
        raise IndexError(index)

    def shard(self, n: int) -> tuple[str, int] | None:
        """(url, epoch) of this slot's n-th shard; None when an `eval` pass is over."""
        if self.mode == "resampled":
            rng = np.random.default_rng([self.seed, self.slot, self.slots, n])
            p = np.asarray(self.weights) / sum(self.weights)
            source = self.sources[rng.choice(len(self.sources), p=p)]
            return source[rng.integers(len(source))], 0
        if self.per_epoch == 0:
            return None
        epoch, i = divmod(n, self.per_epoch)
        if self.mode == "eval":
            return (self._flat(self.slot + i * self.slots), 0) if epoch == 0 else None
        order = np.random.default_rng([self.seed, epoch]).permutation(self.total)
        return self._flat(int(order[self.slot + i * self.slots])), epoch
