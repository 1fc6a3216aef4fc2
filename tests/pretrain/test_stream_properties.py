"""Properties of the shard stream, on random shard sets (hypothesis), through the real loader and its
DataLoader workers:

- `epoch` sampling reads every good sample exactly once per epoch across all partitions, and the stream goes
  on past every epoch boundary (it used to end when a block finished exactly on an epoch's last sample);
- `resampled` sampling never ends;
- the sequence of global batches (keys and augmentation seeds) depends on the partitions and the global batch,
  not on ranks x workers x accumulation steps, also across a resume onto another topology after any step.

Shards are 0- to 6-sample tars whose samples are good or bad (a bad one fails to decode and is skipped).
The CI profile (tests/conftest.py) fixes the seed.
"""

from __future__ import annotations

import io
import logging
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from helpers import LoaderRanks
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pretrain.config import DataConfig
from pretrain.data.loader import StreamLoader
from pretrain.data.stream import StreamConfig
from webshards.samples import BadSample

MAX_BATCHES = 3000  # a stream that needs more than this to show a property has a bug (or hangs)


def decode(raw: dict) -> tuple[str, str]:
    """A sample is its key; the `bad` member marks one that fails to decode."""
    if "bad" in raw:
        raise BadSample("bad_image")
    return raw["__key__"], raw["txt"].decode()


def as_list(items: list) -> list:
    return items


def write_shards(folder: Path, shards: list[list[bool]]) -> tuple[tuple[str, ...], set[str]]:
    """One tar per list (True = a good sample); returns the shard paths and the good keys."""
    urls, good = [], set()
    for s, samples in enumerate(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, ok in enumerate(samples):
                key = f"{s:05d}{i:04d}"
                for ext, data in (("txt", key.encode()), ("bad" if not ok else "cls", b"0")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                if ok:
                    good.add(key)
        urls.append(str(path))
    return tuple(urls), good


def loader(urls, mode: str, rank: int, topology: tuple[int, int, int], micro: int, buffer: int,
           partitions: int) -> StreamLoader:  # fmt: skip
    world, workers, accum = topology
    cfg = StreamConfig(
        sources=(urls,), weights=(1.0,), mode=mode, seed=7, rank=rank, world=world, batch_size=micro,
        data=DataConfig(shuffle_buffer=buffer, max_bad_fraction=1.0, retries=0, workers=workers),
        partitions=partitions,
    )  # fmt: skip
    return StreamLoader(cfg, decode, as_list, as_list, accum_steps=accum)


shard_sets = st.lists(st.lists(st.booleans(), max_size=6), min_size=1, max_size=6)
# (world, workers, accumulation steps)
topologies = st.tuples(st.integers(1, 2), st.integers(0, 2), st.integers(1, 2))
settings_ = {
    "shards": shard_sets,
    "partitions": st.sampled_from([1, 2, 4]),
    "unit": st.integers(1, 3),
    "buffer": st.sampled_from([1, 2, 3, 4, 6, 1000]),
}


def fits(topology: tuple[int, int, int], partitions: int, unit: int) -> bool:
    """The topology owns whole partitions and cuts the global batch into whole micro-batches."""
    world, workers, accum = topology
    return partitions % (world * max(1, workers)) == 0 and (unit * partitions) % (world * accum) == 0


def micro(topology: tuple[int, int, int], partitions: int, unit: int) -> int:
    world, _, accum = topology
    return unit * partitions // (world * accum)


def feasible(shards: list[list[bool]], partitions: int, mode: str) -> bool:
    """Some good sample exists, and epoch sampling has a shard for every partition."""
    has_good = any(any(s) for s in shards)
    return has_good and (mode != "epoch" or len(shards) >= partitions)


class Run(LoaderRanks):
    """Every rank's loader of one topology, in one process: the global batches they read together."""

    def __init__(self, urls, mode, topology, unit, buffer, partitions, state: list | None = None) -> None:
        self.topology = topology
        size = micro(topology, partitions, unit)
        super().__init__(
            [loader(urls, mode, r, topology, size, buffer, partitions) for r in range(topology[0])], state
        )

    def steps(self, n: int) -> list[tuple]:
        """Each global batch's (keys, seeds), in rank order as gathered negatives see it."""
        out = []
        for _ in range(n):
            keys, seeds = [], []
            for source in self.loaders:
                for _ in range(self.topology[2]):
                    _, batch_keys, info = source.next_micro_batch()
                    keys += batch_keys
                    seeds += info["seeds"]
            out.append((tuple(keys), tuple(seeds)))
        return out


@given(**settings_, topology=topologies, epochs=st.integers(1, 3))
def test_epoch_reads_every_good_sample_once_per_epoch(shards, partitions, unit, buffer, topology, epochs):
    assume(feasible(shards, partitions, "epoch") and fits(topology, partitions, unit))
    with tempfile.TemporaryDirectory() as tmp:
        urls, good = write_shards(Path(tmp), shards)
        seen = Counter()
        run = Run(urls, "epoch", topology, unit, buffer, partitions)
        reached: dict[int, int] = {}  # partition -> the highest epoch it has read into
        for _ in range(MAX_BATCHES):
            for source in run.loaders:
                _, keys, info = source.next_raw_batch()
                seen.update((k, e) for k, e in zip(keys, info["epochs"]) if e < epochs)
                reached[info["partition"]] = max(info["epochs"])
            if len(reached) == partitions and min(reached.values()) >= epochs:
                break
        else:
            raise AssertionError(f"the partitions did not get past epoch {epochs} in {MAX_BATCHES} units")
        run.close()
    assert seen == Counter({(k, e): 1 for k in good for e in range(epochs)})


@given(**settings_, topology=topologies)
def test_resampled_never_ends(shards, partitions, unit, buffer, topology):
    assume(feasible(shards, partitions, "resampled") and fits(topology, partitions, unit))
    with tempfile.TemporaryDirectory() as tmp:
        urls, good = write_shards(Path(tmp), shards)
        run = Run(urls, "resampled", topology, unit, buffer, partitions)
        raw = sum(len(s) for s in shards)
        keys = [k for batch_keys, _ in run.steps(3 * raw // (unit * partitions) + 2) for k in batch_keys]
        run.close()
    assert set(keys) <= good


@settings(max_examples=30)
@given(**settings_, mode=st.sampled_from(["epoch", "resampled"]), total=st.integers(2, 8), data=st.data())
def test_global_batches_do_not_depend_on_the_topology_across_a_resume(
    shards, partitions, unit, buffer, mode, total, data
):
    """One topology reads `cut` steps and checkpoints; another resumes: the global batches (keys and their
    augmentation seeds, in order) are those of one process reading the whole run alone."""
    assume(feasible(shards, partitions, mode))
    fitting = topologies.filter(lambda t: fits(t, partitions, unit))
    before = data.draw(fitting, label="(ranks, workers, accumulation) before")
    after = data.draw(fitting, label="(ranks, workers, accumulation) after")
    cut = data.draw(st.integers(0, total), label="steps before the interruption")
    with tempfile.TemporaryDirectory() as tmp:
        urls, _ = write_shards(Path(tmp), shards)
        alone = Run(urls, mode, (1, 0, 1), unit, buffer, partitions)
        expected = alone.steps(total)
        alone.close()
        first = Run(urls, mode, before, unit, buffer, partitions)
        got = first.steps(cut)
        state = first.state()
        first.close()
        resumed = Run(urls, mode, after, unit, buffer, partitions, state)
        got += resumed.steps(total - cut)
        resumed.close()
    assert got == expected


@pytest.mark.parametrize(
    ("world", "workers", "micro", "used"),
    [(1, 14, 512, 8), (2, 3, 6, 3), (2, 3, 8, 2), (1, 1, 5, 1), (1, 0, 5, 0), (2, 7, 7, 7)],
)
def test_a_default_run_uses_the_most_workers_that_share_the_global_batch(world, workers, micro, used, caplog):
    """Left unset, data.partitions is one per loader slot, so ranks x workers must divide the global batch: the
    loader keeps the most workers (up to data.workers) that do, and says so when that is fewer."""
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        made = loader(("unused.tar",), "epoch", 0, (world, workers, 1), micro, 1, 0)
    assert made.workers == made.stream_cfg.data.workers == used
    assert (
        made.stream_cfg.partitions == world * max(1, used)
        and (micro * world) % made.stream_cfg.partitions == 0
    )
    assert (f"{used} of data.workers={workers} loader workers" in caplog.text) == (used != workers)
