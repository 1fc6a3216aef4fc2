"""Properties of the shard stream, on random shard sets (hypothesis), through the real loader and its
DataLoader workers:

- `epoch` sampling reads every good sample exactly once per epoch across all ranks and workers, and the
  stream goes on past every epoch boundary (it used to end when a block finished exactly on an epoch's
  last sample);
- `resampled` sampling never ends;
- resuming from the state after any batch gives exactly the continuation of the uninterrupted stream.

Shards are 0- to 6-sample tars whose samples are good or bad (a bad one fails to decode and is skipped).
The CI profile (tests/conftest.py) fixes the seed.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import assume, given
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


def loader(urls, mode: str, rank: int, world: int, workers: int, batch: int, buffer: int) -> StreamLoader:
    cfg = StreamConfig(
        sources=(urls,), weights=(1.0,), mode=mode, seed=7, rank=rank, world=world, batch_size=batch,
        data=DataConfig(shuffle_buffer=buffer, max_bad_fraction=1.0, retries=0, workers=workers),
    )  # fmt: skip
    return StreamLoader(cfg, decode, as_list, as_list)


shard_sets = st.lists(st.lists(st.booleans(), max_size=6), min_size=1, max_size=6)
settings_ = {
    "shards": shard_sets,
    "workers": st.integers(0, 2),
    "world": st.integers(1, 2),
    "batch": st.integers(1, 3),
    "buffer": st.sampled_from([1, 2, 3, 4, 6, 1000]),
}


def feasible(shards: list[list[bool]], world: int, workers: int, mode: str) -> bool:
    """Some good sample exists, and epoch sampling has a shard for every loader slot."""
    has_good = any(any(s) for s in shards)
    return has_good and (mode != "epoch" or len(shards) >= world * max(1, workers))


@given(**settings_, epochs=st.integers(1, 3))
def test_epoch_reads_every_good_sample_once_per_epoch(shards, workers, world, batch, buffer, epochs):
    assume(feasible(shards, world, workers, "epoch"))
    with tempfile.TemporaryDirectory() as tmp:
        urls, good = write_shards(Path(tmp), shards)
        seen = Counter()
        for rank in range(world):
            source = loader(urls, "epoch", rank, world, workers, batch, buffer)
            reached: dict[int, int] = {}  # worker role -> the highest epoch it has read into
            for _ in range(MAX_BATCHES):
                _, keys, info = source.next_raw_batch()
                seen.update((k, e) for k, e in zip(keys, info["epochs"]) if e < epochs)
                reached[info["role"]] = max(info["epochs"])
                if len(reached) == max(1, workers) and min(reached.values()) >= epochs:
                    break
            else:
                raise AssertionError(f"rank {rank} did not get past epoch {epochs} in {MAX_BATCHES} batches")
            source.close()
    assert seen == Counter({(k, e): 1 for k in good for e in range(epochs)})


@given(**settings_)
def test_resampled_never_ends(shards, workers, world, batch, buffer):
    assume(feasible(shards, world, workers, "resampled"))
    with tempfile.TemporaryDirectory() as tmp:
        urls, good = write_shards(Path(tmp), shards)
        source = loader(urls, "resampled", world - 1, world, workers, batch, buffer)
        raw = sum(len(s) for s in shards)
        keys = [k for _ in range(3 * raw // batch + 2) for k in source.next_raw_batch()[1]]
        source.close()
    assert set(keys) <= good


@given(**settings_, mode=st.sampled_from(["epoch", "resampled"]), total=st.integers(2, 12), data=st.data())
def test_resume_after_any_batch_continues_exactly(shards, workers, world, batch, buffer, mode, total, data):
    assume(feasible(shards, world, workers, mode))
    cut = data.draw(st.integers(0, total), label="batches before the interruption")
    rank = data.draw(st.integers(0, world - 1), label="rank")

    def batches(source: StreamLoader, n: int) -> list[tuple]:
        """Each batch's keys and augmentation seeds."""
        return [(tuple(b[1]), tuple(b[2]["seeds"])) for b in (source.next_raw_batch() for _ in range(n))]

    with tempfile.TemporaryDirectory() as tmp:
        urls, _ = write_shards(Path(tmp), shards)
        whole = loader(urls, mode, rank, world, workers, batch, buffer)
        expected = batches(whole, total)
        whole.close()
        first = loader(urls, mode, rank, world, workers, batch, buffer)
        got = batches(first, cut)
        state = first.state_dict()
        first.close()
        resumed = loader(urls, mode, rank, world, workers, batch, buffer)
        resumed.load_state_dict(state)
        got += batches(resumed, total - cut)
        resumed.close()
    assert got == expected
