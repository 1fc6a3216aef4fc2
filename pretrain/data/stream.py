"""The loader-worker side of the WebDataset pipeline: shards -> raw samples -> shuffled blocks -> units.

A training stream is cut into `partitions` canonical *partitions*, each with its own shard sequence
(`ShardPlan`, slot = partition) and its own shuffle. Every optimizer step takes one *unit* of
`global batch / partitions` samples from every partition, in partition order, so the sequence of global
batches depends on the seed, the data spec, the global batch and `data.partitions` only: not on how many ranks
or workers read it. Rank `r` of `world` owns the partitions `[r*P/world, (r+1)*P/world)`; worker `j` of a
rank's `k` owns its rank's `i`-th partition where `i % k == j`, and yields one unit of each in turn, step after
step (the DataLoader takes batches from its workers round-robin, so a rank's units arrive in partition order).
An `eval` pass has one partition per loader slot and units of the eval batch size.

Shuffling is by *blocks*: the next `shuffle_buffer` raw samples of a partition are permuted by an RNG
seeded from (seed, partition, partitions, block number), and blocks never cross an epoch. Every unit carries
its partition's `Position` after it, so the main process always knows, per partition, exactly where the
consumed data ends; resuming re-reads at most the current block and continues mid-block. Bad samples,
truncated tars and unreachable shards are skipped and counted by reason; a window with too many bad samples
stops the run with the shards named.

An epoch's last block may be empty (the previous block ended exactly on the epoch's last sample); the stream
then moves on to the next epoch. Only an `eval` pass ends. Anything the stream cannot recover from is a
`DataError` whose message is one line naming the shards and the partition's position.
"""

from __future__ import annotations

import itertools
import logging
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.config import DataConfig
from pretrain.data.decode import seeded
from pretrain.data.plan import ShardPlan
from webshards.layout import UNSAFE_MEMBER, iter_shard
from webshards.retries import retries_so_far
from webshards.samples import BadSample
from webshards.urls import open_url, redact_url

log = logging.getLogger("pretrain")


class DataError(RuntimeError):
    """The data cannot feed the run (too many bad samples, unreadable or empty shards): one line that names
    the shards and where the worker stood."""


@dataclass
class Position:
    """Where a partition's stream stands: the current block starts `offset` raw samples into shard `shard`."""

    shard: int = 0
    offset: int = 0
    block: int = 0
    emitted: int = 0
    """Entries of the block's permutation already used."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Cumulative bad samples / shards by reason."""
    epoch: int = 0


@dataclass
class StreamConfig:
    sources: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...]
    mode: str
    seed: int
    rank: int
    world: int
    batch_size: int
    """The rank's micro-batch (training) or eval batch."""
    data: DataConfig = field(default_factory=DataConfig)
    """The `data` section: shuffle_buffer, max_bad_fraction, bad_window, retries, workers, prefetch."""
    partitions: int = 0
    """Canonical partitions of the stream (0: one per loader slot, `world * max(1, workers)`)."""
    unit: int = 0
    """Samples a worker reads from a partition at a time: `global batch / partitions` (0: `batch_size`)."""

    @property
    def slots(self) -> int:
        """Loader slots of one rank: its DataLoader workers (1 in the training process itself)."""
        return max(1, self.data.workers)

    @property
    def total_partitions(self) -> int:
        return self.partitions or self.world * self.slots

    def owned(self, role: int) -> list[int]:
        """The partitions worker `role` of this rank reads, in the order it yields their units."""
        per_rank = self.total_partitions // self.world
        return [self.rank * per_rank + i for i in range(role, per_rank, self.slots)]


def check_topology(partitions: int, world: int, slots: int, global_batch: int | None) -> None:
    """Refuse, in one line, a topology that cannot own whole partitions or a global batch they cannot share."""
    if partitions % (world * slots):
        raise ValueError(
            f"data.partitions={partitions} cannot be read by {world} rank(s) x {slots} loader worker(s) = "
            f"{world * slots} slots that each own whole partitions: use ranks x max(1, data.workers) dividing "
            f"{partitions} (the run's sample order is fixed by data.partitions, set when it started)"
        )
    if global_batch is not None and global_batch % partitions:
        raise ValueError(
            f"the global batch {global_batch} (train.batch_size x ranks x train.accum_steps) is not a multiple "
            f"of data.partitions={partitions}: every step takes the same number of samples from each partition"
        )


class ShardReader:
    """Raw samples of a plan from a position, keeping the current tar open between blocks."""

    def __init__(self, plan: ShardPlan, retries: int) -> None:
        self.plan, self.retries = plan, retries
        self._live: tuple[int, int, Iterator[dict]] | None = None  # (shard n, offset, iterator)
        self.failed_in_a_row = 0
        self._dry: set[str] = set()
        """Shards read since the last raw sample: when it covers them all, no sample can ever come."""
        self._distinct = len({url for urls in plan.sources for url in urls})

    def _open(self, n: int, offset: int, counts: Counter | None) -> Iterator[dict] | None:
        """An iterator over shard `n` from raw sample `offset`; None (counted) if it cannot be opened."""
        url, _ = self.plan.shard(n)
        try:
            stream = open_url(url, self.retries)
        except OSError as e:
            self._count(counts, "unreachable_shard", url, e)
            return None
        return self._samples(stream, url, n, offset, counts)

    def _samples(self, stream, url: str, n: int, offset: int, counts: Counter | None) -> Iterator[dict]:
        with stream as f:
            try:
                for i, raw in enumerate(iter_shard(f, decode=False, mark_unsafe=True)):
                    if i >= offset:
                        raw["__url__"], raw["__shard__"] = url, n
                        yield raw
            except (tarfile.TarError, EOFError, OSError) as e:
                self._count(counts, "truncated_tar", url, e)
        self.failed_in_a_row = 0

    def _count(self, counts: Counter | None, reason: str, url: str, error: Exception) -> None:
        log.warning("skipping the rest of %s: %s (%s)", redact_url(url), reason, redact_url(str(error)))
        self.failed_in_a_row += 1
        if counts is not None:
            counts[reason] += 1
        if self.failed_in_a_row >= min(self.plan.total, 20):
            raise DataError(
                f"{self.failed_in_a_row} shards in a row failed to read (partition {self.plan.slot} of "
                f"{self.plan.slots}); last: {redact_url(url)} ({redact_url(str(error))})"
            )

    def read_block(self, start: Position, size: int, counts: Counter | None) -> tuple[list[dict], Position]:
        """Up to `size` raw samples from `start`, not crossing an epoch; returns them and the end position."""
        n, offset, block = start.shard, start.offset, []
        planned = self.plan.shard(n)
        epoch = None if planned is None else planned[1]
        while len(block) < size and planned is not None and planned[1] == epoch:
            it = (
                self._live[2]
                if self._live and self._live[:2] == (n, offset)
                else self._open(n, offset, counts)
            )
            for raw in it or ():
                block.append(raw)
                offset += 1
                self._dry.clear()
                if len(block) == size:
                    self._live = (n, offset, it)
                    return block, replace(start, shard=n, offset=offset, epoch=epoch)
            if offset == 0:  # read from its start, and nothing in it
                self._check_not_dry(planned[0], n)
            n, offset, self._live = n + 1, 0, None
            planned = self.plan.shard(n)
        return block, replace(start, shard=n, offset=offset, epoch=epoch if epoch is not None else 0)

    def _check_not_dry(self, url: str, n: int) -> None:
        """Stop a stream that would spin forever: every shard of the spec read since the last sample, and
        each of them empty."""
        self._dry.add(url)
        if self.plan.mode != "eval" and len(self._dry) == self._distinct:
            raise DataError(
                f"none of the {self._distinct} shards holds a sample (partition {self.plan.slot} of "
                f"{self.plan.slots}, its shard #{n}: {redact_url(url)})"
            )


class ShardStream(IterableDataset):
    """Units `(inputs, texts, info)` for one rank; `info` has the unit's partition, keys, augmentation seeds
    and the partition's `Position` after it, `shard`: the partition's shard number (`ShardPlan.shard`) its
    last sample came from, so the consumer can count the shards read to the end (an eval pass's progress), the
    worker's `role` and `storage_retries`: the storage requests retried while its stream ran
    (`webshards.retries`; a worker process counts its own)."""

    def __init__(
        self,
        cfg: StreamConfig,
        decode: Callable[[dict], tuple[torch.Tensor, str]],
        collate: Callable[[list[torch.Tensor]], torch.Tensor | list],
        tokenize: Callable[[list[str]], torch.Tensor],
        positions: dict[int, Position] | None = None,
    ) -> None:
        self.cfg, self.decode, self.collate, self.tokenize = cfg, decode, collate, tokenize
        self.positions = positions or {}

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        return self.iter_role(info.id if info else 0)

    def iter_role(self, role: int) -> Iterator[tuple]:
        """The units of worker `role` of the rank's `cfg.slots` (what that DataLoader worker yields): one of each of its
        partitions in turn, for ever; an `eval` pass yields its one partition's batches and ends."""
        c = self.cfg
        streams = {
            p: self._samples(ShardPlan(c.sources, c.weights, c.mode, c.seed, p, c.total_partitions), p)
            for p in c.owned(role)
        }
        retried_before = retries_so_far()

        def unit(p: int, items: list) -> tuple:
            return self._batch(items, p, role, retries_so_far() - retried_before)

        if c.mode == "eval":  # one partition per slot
            for p, samples in streams.items():
                while items := list(itertools.islice(samples, c.unit or c.batch_size)):
                    yield unit(p, items)
            return
        while True:
            for p, samples in streams.items():
                yield unit(p, list(itertools.islice(samples, c.unit or c.batch_size)))

    def _batch(self, items: list, partition: int, role: int, retries: int) -> tuple:
        images, captions, keys, seeds, positions, shards = zip(*items)
        info = {
            "partition": partition,
            "role": role,
            "storage_retries": retries,
            "keys": list(keys),
            "seeds": list(seeds),  # each sample's augmentation seed: device-side augmentation replays it
            "position": positions[-1],
            "epochs": [p.epoch for p in positions],
            "shard": shards[-1],
        }
        return self.collate(list(images)), self.tokenize(list(captions)), info

    def _samples(self, plan: ShardPlan, partition: int) -> Iterator[tuple]:
        c = self.cfg
        reader = ShardReader(plan, c.data.retries)
        pos = replace(self.positions.get(partition, Position()))
        pos.skipped = Counter(pos.skipped)
        window: deque[tuple[str, str]] = deque(maxlen=c.data.bad_window)  # (what was bad or '', url)
        in_worker = get_worker_info() is not None
        while True:
            block, end = reader.read_block(
                pos, max(1, c.data.shuffle_buffer), pos.skipped if pos.emitted == 0 else None
            )
            if not block:
                if plan.shard(end.shard) is None:  # an eval pass is over; training streams never end
                    return
                pos = replace(end, block=pos.block, emitted=0, skipped=pos.skipped)  # the next epoch
                continue
            order = self._order(plan, pos.block, len(block))
            for idx in range(pos.emitted, len(block)):
                raw = block[order[idx]]
                pos.emitted = idx + 1
                seed = self._sample_seed(plan, pos.block, idx)
                try:
                    image, caption = self._decode_seeded(raw, seed, keep_rng=not in_worker)
                except BadSample as e:
                    pos.skipped[e.reason] += 1
                    self._watch(window, str(e), raw["__url__"], plan, pos)
                    continue
                self._watch(window, "", raw["__url__"], plan, pos)
                position = replace(pos, skipped=dict(pos.skipped), epoch=end.epoch)
                yield image, caption, raw["__key__"], seed, position, raw["__shard__"]
            pos = replace(end, block=pos.block + 1, emitted=0, skipped=pos.skipped)

    def _decode_seeded(self, raw: dict, seed: int, keep_rng: bool) -> tuple:
        """Decode with the CPU random streams the transforms draw from (torch's generator, Python's
        `random`) seeded for this sample, so augmentation replays on resume. In the training process itself
        (`data.workers=0`) the trainer's random state is put back after."""
        if UNSAFE_MEMBER in raw:  # the tar reader left its members unread: a member name escaped the sample
            raise BadSample(UNSAFE_MEMBER, raw[UNSAFE_MEMBER])
        raw["__seed__"] = seed  # several captions: the one drawn (`decode.caption_of`)
        with seeded(seed, restore=keep_rng):
            return self.decode(raw)

    def _order(self, plan: ShardPlan, block: int, n: int) -> np.ndarray:
        if self.cfg.mode == "eval" or self.cfg.data.shuffle_buffer <= 1:
            return np.arange(n)
        return np.random.default_rng([self.cfg.seed, plan.slot, plan.slots, block]).permutation(n)

    def _sample_seed(self, plan: ShardPlan, block: int, idx: int) -> int:
        return int(
            np.random.SeedSequence([self.cfg.seed, plan.slot, plan.slots, block, idx]).generate_state(1)[0]
        )

    def _watch(self, window: deque, bad: str, url: str, plan: ShardPlan, pos: Position) -> None:
        """Record one sample (`bad`: why it was bad, '' if good); stop when too many of the last were bad,
        naming the shards and the last reason (a wrong data.text_key makes every sample bad)."""
        window.append((bad, url))
        if len(window) < window.maxlen:
            return
        fraction = sum(bool(b) for b, _ in window) / len(window)
        if fraction > self.cfg.data.max_bad_fraction:
            shards = sorted({u for b, u in window if b})
            last = next(b for b, _ in reversed(window) if b)
            raise DataError(
                f"{fraction:.0%} of the last {len(window)} samples were bad (data.max_bad_fraction="
                f"{self.cfg.data.max_bad_fraction}); shards: {', '.join(shards[:10])}; the last: {last} "
                f"(partition {plan.slot} of {plan.slots}, block from its shard #{pos.shard} sample {pos.offset})"
            )
