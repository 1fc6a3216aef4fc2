"""Several captions per sample (`data.text_key=json:FIELD` holding a list): one drawn per sample per epoch from
the sample's seed, so every caption is seen over epochs and the draw is the same on any ranks, workers and
across stop + resume; a text key that finds nothing is counted, and stops the run with the reason named."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from helpers import TINY, LoaderRanks, read_jsonl, train_in_process

from pretrain.config import ConfigError, DataConfig, load_config
from pretrain.data.decode import caption_of
from pretrain.data.loader import StreamLoader
from pretrain.data.stream import StreamConfig
from webshards.samples import BadSample

CAPTIONS = ("a", "b", "c")
SHARDS, PER_SHARD = 4, 3  # 12 samples: one epoch is one step of the global batch of 12
PARTITIONS = 4


def key_and_caption(raw: dict) -> tuple[str, str]:
    return raw["__key__"], caption_of(raw, "json:captions")


def as_list(items: list) -> list:
    return items


def write_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> tuple[str, ...]:
    """Shards whose samples hold three captions each in KEY.json (`KEY-a`, `KEY-b`, `KEY-c`)."""
    folder = tmp_path_factory.mktemp("captions")
    urls = []
    for s in range(SHARDS):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(PER_SHARD):
                key = f"{s:05d}{i:04d}"
                write_member(
                    tar, f"{key}.json", json.dumps({"captions": [f"{key}-{c}" for c in CAPTIONS]}).encode()
                )
                write_member(tar, f"{key}.txt", b"one caption")
        urls.append(str(path))
    return tuple(urls)


class Ranks(LoaderRanks):
    """Every rank's loader of one topology (world, workers) in this process: the global batches together."""

    def __init__(self, urls: tuple[str, ...], world: int, workers: int, state: list | None = None) -> None:
        def loader(rank: int) -> StreamLoader:
            data = DataConfig(shuffle_buffer=2, retries=0, workers=workers)
            cfg = StreamConfig(sources=(urls,), weights=(1.0,), mode="epoch", seed=3, rank=rank, world=world,
                               batch_size=SHARDS * PER_SHARD // world, data=data, partitions=PARTITIONS)  # fmt: skip
            return StreamLoader(cfg, key_and_caption, as_list, as_list)

        super().__init__([loader(r) for r in range(world)], state)

    def steps(self, n: int) -> list[list[str]]:
        """Each global batch's captions, in rank order."""
        out = []
        for _ in range(n):
            out.append([caption for source in self.loaders for caption in source.next_micro_batch()[1]])
        return out


def read(urls, world: int, workers: int, steps: int, state: list | None = None) -> tuple[list, list]:
    ranks = Ranks(urls, world, workers, state)
    try:
        return ranks.steps(steps), ranks.state()
    finally:
        ranks.close()


EPOCHS = 30


@pytest.fixture(scope="module")
def one_rank(caption_shards) -> list[list[str]]:
    return read(caption_shards, world=1, workers=0, steps=EPOCHS)[0]


def test_one_caption_per_sample_per_epoch_and_every_caption_over_epochs(one_rank):
    drawn = defaultdict(Counter)
    for batch in one_rank:  # one step is one epoch here
        keys = [caption.split("-")[0] for caption in batch]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == SHARDS * PER_SHARD
        for caption in batch:
            key, which = caption.split("-")
            drawn[key][which] += 1
    assert all(set(counts) == set(CAPTIONS) for counts in drawn.values()), drawn
    # the draw changes between epochs: not one caption per sample for ever (1/3 chance per sample and epoch)
    assert all(max(counts.values()) < EPOCHS * 0.6 for counts in drawn.values()), drawn


@pytest.mark.parametrize("world, workers", [(2, 0), (2, 2), (1, 2)])
def test_the_draw_is_the_same_on_any_ranks_and_workers(caption_shards, one_rank, world, workers):
    assert read(caption_shards, world, workers, steps=6)[0] == one_rank[:6]


def test_the_draw_continues_exactly_after_a_resume(caption_shards, one_rank):
    first, state = read(caption_shards, world=2, workers=0, steps=4)
    then, _ = read(caption_shards, world=1, workers=2, steps=4, state=state)
    assert first + then == one_rank[:8]


def raw(**members) -> dict:
    return {k: v if isinstance(v, bytes) else json.dumps(v).encode() for k, v in members.items()}


@pytest.mark.parametrize(
    "sample, key, reason",
    [
        (raw(txt=b"x"), "json:captions", "missing_caption"),  # no KEY.json
        (raw(json={"caption": "x"}), "json:captions", "missing_caption"),  # no such field
        (raw(json={"captions": []}), "json:captions", "empty_caption"),
        (raw(json={"captions": ["", " "]}), "json:captions", "empty_caption"),
        (raw(json={"captions": [1, 2]}), "json:captions", "bad_caption"),
        (raw(json=b"{not json"), "json:captions", "bad_caption"),
        (raw(json={"caption": "x"}), "caption", "missing_caption"),  # no KEY.caption member
    ],
)
def test_a_text_key_that_finds_no_caption_is_a_counted_bad_sample(sample, key, reason):
    with pytest.raises(BadSample) as e:
        caption_of(sample, key)
    assert e.value.reason == reason


def test_text_keys_read_a_member_whole_or_a_json_field():
    sample = raw(txt=b"line one\nline two", json={"caption": "from json", "captions": ["only"]})
    assert caption_of(sample) == "line one\nline two"  # a txt is one caption, as img2dataset writes it
    assert caption_of(sample, "json:caption") == "from json"
    assert caption_of(sample, "json:captions") == "only"


def test_text_key_alternatives_take_the_first_that_holds_a_caption():
    """open_clip main's `--text-key txt;caption` (first member present) and `--json-text-key a;b` (first
    non-empty field in order wins)."""
    sample = raw(caption=b"member two", json={"empty": "", "none": [], "second": ["b1", "b2"], "third": "c"})
    assert caption_of(sample, "txt;caption") == "member two"
    assert caption_of(sample, "json:missing;empty;none;second;third") in ("b1", "b2")
    assert caption_of(sample, "json:third;second") == "c"
    with pytest.raises(BadSample) as e:
        caption_of(sample, "json:x;y")
    assert e.value.reason == "missing_caption"


@pytest.mark.parametrize("key", ["json:", "txt:lines", " txt", "", "txt;", "json:a;"])
def test_a_malformed_text_key_is_a_config_error(key):
    with pytest.raises(ConfigError, match="data.text_key"):
        load_config(TINY, [f"data.text_key='{key}'"])


def test_a_wrong_text_key_stops_training_with_the_reason_named(tmp_path, demo_data):
    """Every sample of the demo shards lacks the field: the run stops after one window, naming why."""
    with pytest.raises(RuntimeError, match=r"samples were bad .*missing_caption: no 'captions' in KEY.json "
                                           r"\(data.text_key=json:captions\)"):  # fmt: skip
        train_in_process(tmp_path, [f"data.train={demo_data}/train/{{00000..00003}}.tar", "train.steps=2",
                                    "train.batch_size=4", "data.text_key=json:captions", "data.bad_window=8"])  # fmt: skip


def test_image_key_picks_the_member(tmp_path, demo_data):
    """`data.image_key` naming no member of the demo shards (they hold jpg): every sample is missing_image."""
    with pytest.raises(RuntimeError, match=r"missing_image"):
        train_in_process(tmp_path, [f"data.train={demo_data}/train/{{00000..00003}}.tar", "train.steps=1",
                                    "train.batch_size=4", "data.image_key=png;webp", "data.bad_window=8"])  # fmt: skip
    run = train_in_process(tmp_path, [f"data.train={demo_data}/train/{{00000..00003}}.tar", "train.steps=1",
                                      "train.batch_size=4", "data.image_key=webp;jpg"], name="jpg")  # fmt: skip
    assert read_jsonl(Path(run) / "metrics.jsonl")[-1]["data_skipped"] == 0
    saved = yaml.safe_load((Path(run) / "config.yaml").read_text())
    assert saved["data"]["image_key"] == "webp;jpg"  # a key that names members is no secret to redact
