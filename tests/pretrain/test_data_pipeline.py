"""The WebDataset pipeline: ranks x workers, exact mid-epoch resume, epoch coverage, bad data survived."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import TINY, process_state_kept, read_jsonl, refused, torchrun, train_in_process, train_runs
from PIL import Image
from safetensors.torch import load_file

from pretrain.config import load_config
from pretrain.data.loader import WebDatasetSource
from pretrain.data.plan import ShardPlan, source_weights
from pretrain.models.build import build_model
from webshards.layout import iter_shard
from webshards.spec import expand_sources

SPEC = "train/{00000..00003}.tar"


def same_params(a: Path, b: Path, step: int) -> bool:
    pa = load_file(a / f"checkpoints/step_{step:08d}/model.safetensors")
    pb = load_file(b / f"checkpoints/step_{step:08d}/model.safetensors")
    return all(torch.equal(pa[k], pb[k]) for k in pa)


def shard_overrides(demo_data: Path, workers: int) -> list[str]:
    return [
        "train.steps=3",
        "train.batch_size=8",
        f"data.train={demo_data}/{SPEC}",
        f"data.workers={workers}",
    ]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, demo_data) -> dict[int, Path]:
    """The 2-rank runs of `test_trains_on_shards_with_ranks_and_workers`, with 0 and 2 data workers, in one
    torchrun (helpers.train_runs: one start-up for both)."""
    root = tmp_path_factory.mktemp("two-ranks")
    runs = {workers: root / f"workers{workers}" for workers in (0, 2)}
    train_runs(
        [
            {
                "train": [
                    f"run.dir={root}",
                    f"run.name={run.name}",
                    "log.every=1",
                    *shard_overrides(demo_data, w),
                ]
            }
            for w, run in runs.items()
        ]
    )
    return runs


@pytest.mark.parametrize("nproc, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_trains_on_shards_with_ranks_and_workers(tmp_path, demo_data, request, nproc, workers):
    if nproc == 1:  # in this process; two ranks need torchrun
        run_dir = train_in_process(tmp_path, shard_overrides(demo_data, workers))
    else:
        run_dir = request.getfixturevalue("two_rank_runs")[workers]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["data_skipped"] == 0 for r in rows)
    assert rows[-1]["samples_seen"] == 3 * 8 * nproc


@pytest.mark.parametrize("sampling", ["epoch", "resampled"])
def test_mid_epoch_resume_with_workers_equals_uninterrupted(tmp_path, demo_data, sampling):
    overrides = [f"data.train={demo_data}/{SPEC}", f"data.sampling={sampling}", "data.workers=2",
                 "data.shuffle_buffer=48", "train.steps=12", "train.batch_size=16", "checkpoint.every=100"]  # fmt: skip
    straight = train_in_process(tmp_path, name="straight", overrides=overrides)
    train_in_process(
        tmp_path, name="resumed", overrides=overrides, until=7
    )  # 7 x 16 = 112 samples: mid-block, mid-shard, mid-epoch
    resumed = train_in_process(tmp_path, name="resumed", overrides=[*overrides, "resume=latest"])
    assert same_params(straight, resumed, 12)
    losses = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl")] for d in (straight, resumed)]
    assert losses[0] == losses[1]


def test_epoch_mode_two_ranks_two_workers_reads_every_sample_once(demo_data):
    bundle = build_model(load_config(TINY).model)
    cfg = load_config(TINY, ["data.workers=2", "data.shuffle_buffer=40", "data.sampling=epoch"]).data
    keys = []
    for rank in range(2):
        source = WebDatasetSource(
            f"{demo_data}/{SPEC}", cfg, "epoch", 0, 8, rank, 2, bundle, torch.device("cpu")
        )
        moved_on = set()
        while len(moved_on) < 2:  # until both partitions of this rank (one per worker) have started epoch 1
            _, _, info = source.next_raw_batch()
            keys += [k for k, e in zip(info["keys"], info["epochs"]) if e == 0]
            if 1 in info["epochs"]:
                moved_on.add(info["partition"])
        source.close()
    expected = [s["__key__"] for i in range(4) for s in iter_shard(demo_data / f"train/{i:05d}.tar")]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys)


def eval_keys(demo_data: Path, rank: int, world: int, workers: int) -> tuple[list[str], list[int], int]:
    """The keys of a rank's eval pass, the shards it counted finished after each batch, and its share."""
    bundle = build_model(load_config(TINY).model)
    cfg = load_config(TINY, [f"data.workers={workers}"]).data
    source = WebDatasetSource(
        f"{demo_data}/{SPEC}", cfg, "eval", 0, 10, rank, world, bundle, torch.device("cpu")
    )
    keys, finished = [], []
    try:
        while True:
            keys += source.next_batch_with_info()[2]["keys"]
            finished.append(source.shards_finished)
    except StopIteration:
        return keys, finished, source.eval_shards


def test_eval_mode_reads_each_sample_once_across_ranks(demo_data):
    """Each rank also counts the shards of its share read to the end (an eval's progress): 128 samples a
    shard, batches of 10, so a worker's first shard is done once a batch ends in its second."""
    (keys0, finished0, share0), (keys1, finished1, share1) = (eval_keys(demo_data, r, 2, 2) for r in (0, 1))
    assert sorted(keys0 + keys1) == sorted(
        s["__key__"] for i in range(4) for s in iter_shard(demo_data / f"train/{i:05d}.tar")
    )
    assert share0 == share1 == 2  # 4 shards dealt to 2 ranks x 2 workers: one shard per worker
    assert finished0 == finished1 == [0] * len(finished0)  # each worker has one shard: done when it ends
    _, finished, share = eval_keys(demo_data, 0, 1, 0)  # one process, its shards in order
    assert share == 4 and finished == sorted(finished) and finished[-1] == 3
    # shard 0 is done once a batch ends in shard 1: the 13th (samples 120-129); shards 1, 2 likewise
    assert [finished.index(n) for n in (1, 2, 3)] == [12, 25, 38]


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> list[int]:
    """Write samples ({key, jpg?, txt?}) to a tar; returns the byte offset where each sample starts."""
    starts = []
    with tarfile.open(path, "w") as tar:
        for s in samples:
            starts.append(tar.offset)
            for ext in ("jpg", "txt"):
                if ext in s:
                    info = tarfile.TarInfo(f"{s['key']}.{ext}")
                    info.size = len(s[ext])
                    tar.addfile(info, io.BytesIO(s[ext]))
    return starts


@pytest.fixture
def bad_shards(tmp_path) -> Path:
    """4 shards x 16 samples with 4 planted problems: truncated JPEG, missing .txt, bad UTF-8, truncated tar."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for shard in range(4):
        samples = [{"key": f"{shard:05d}{i:04d}", "jpg": jpeg((16 * i, 100, 50 * shard)), "txt": f"colour {i}".encode()}
                   for i in range(16)]  # fmt: skip
        if shard == 0:
            samples[3]["jpg"] = samples[3]["jpg"][:200]
        if shard == 1:
            del samples[5]["txt"]
        if shard == 2:
            samples[9]["txt"] = b"caf\xe9 \xff"
        starts = write_tar(folder / f"{shard:05d}.tar", samples)
        if shard == 3:  # cut inside sample 7: samples 0-6 survive, the rest of the tar is unreadable
            data = (folder / "00003.tar").read_bytes()
            (folder / "00003.tar").write_bytes(data[: starts[7] + 700])
    (folder / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": 16 for s in range(4)}))
    return folder


def test_bad_data_is_skipped_and_counted_exactly(tmp_path, bad_shards):
    good = 3 * 16 - 3 + 7  # 52 samples in one epoch: 13 steps of 4 end exactly at the epoch's end
    run_dir = train_in_process(tmp_path, name="bad", overrides=[f"data.train={bad_shards}/{{00000..00003}}.tar", "train.batch_size=4",
                                      f"train.steps={good // 4}", "data.shuffle_buffer=16"])  # fmt: skip
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 13 and rows[-1]["data_skipped"] == 4


def test_mostly_bad_data_stops_with_the_shards_named(tmp_path, bad_shards):
    for shard in range(3):  # every image undecodable
        samples = [{"key": f"{shard:05d}{i:04d}", "jpg": b"not a jpeg", "txt": b"x"} for i in range(16)]
        write_tar(bad_shards / f"{shard:05d}.tar", samples)
    with pytest.raises(RuntimeError, match=r"samples were bad .* shards: .*00000.tar"):
        train_in_process(tmp_path, name="worse", overrides=[f"data.train={bad_shards}/{{00000..00002}}.tar", "train.batch_size=4",
                                  "train.steps=5", "data.bad_window=20"])  # fmt: skip


def test_missing_source_is_a_clear_startup_error(tmp_path, demo_data, capsys):
    source = f"{tmp_path}/nope/{{00000..00001}}.tar"
    args = ["train", "--config", str(TINY), f"run.dir={tmp_path}", f"data.train={demo_data}/{SPEC}::{source}"]
    assert refused(args, capsys, tmp_path / "tiny") == (
        f"pretrain: error: shard not found: {tmp_path}/nope/00000.tar (2 of 2 in source '{source}'; a source is "
        "a folder of .tar shards, a file, or a brace pattern such as DIR/{00000..00015}.tar)"
    )


def test_resampled_sources_follow_their_weights():
    plan = ShardPlan((("a0", "a1"), ("b0",)), (3.0, 1.0), "resampled", seed=0, slot=1, slots=4)
    drawn = Counter(plan.shard(n)[0][0] for n in range(4000))
    assert 2.7 < drawn["a"] / drawn["b"] < 3.3
    assert [plan.shard(n) for n in range(50)] == [plan.shard(n) for n in range(50)]  # a pure function of n


def test_upsampling_factors_draw_shards_as_open_clip_train_does():
    """`data.train_upsampling_factors` against open_clip_train's `--train-data-upsampling-factors`: its
    `expand_urls` gives each shard its source's factor, and its resampler draws shards by those weights."""
    from open_clip_train.data import expand_urls

    spec, factors = "a/{00000..00002}.tar::b/{00000..00004}.tar", [1.0, 2.0]
    urls, per_shard = expand_urls(spec, "::".join(map(str, factors)))
    theirs = {url: w / sum(per_shard) for url, w in zip(urls, per_shard)}
    sources = tuple(tuple(u) for u in expand_sources(spec))
    weights = source_weights(spec, None, factors)
    ours = {u: w / sum(weights) / len(src) for src, w in zip(sources, weights) for u in src}
    assert ours == pytest.approx(theirs, rel=1e-12)
    plan = ShardPlan(sources, tuple(weights), "resampled", seed=0, slot=0, slots=1)
    drawn = Counter(plan.shard(n)[0] for n in range(8000))
    assert all(abs(drawn[u] / 8000 - p) < 0.02 for u, p in theirs.items())


def test_epoch_plan_deals_every_shard_once_per_epoch():
    urls = tuple(f"s{i}" for i in range(7))
    plans = [ShardPlan((urls,), (1.0,), "epoch", seed=3, slot=s, slots=3) for s in range(3)]
    for epoch in range(2):
        seen = [p.shard(epoch * p.per_epoch + i) for p in plans for i in range(p.per_epoch)]
        assert sorted(u for u, _ in seen) == sorted(urls) and {e for _, e in seen} == {epoch}
    with pytest.raises(ValueError, match="cannot feed 8 stream partitions"):
        ShardPlan((urls,), (1.0,), "epoch", seed=3, slot=0, slots=8)


def test_three_epochs_whose_length_is_a_multiple_of_the_buffer_finish(tmp_path, demo_data):
    """The issue's repro (512 samples, a 128-sample buffer, batch 64), halved: 256 samples in 2 shards, a
    64-sample buffer, batch 32: 4 blocks and 8 steps an epoch, the last block ending on the epoch's last
    sample, 3 epochs."""
    overrides = [f"data.train={demo_data}/train/{{00000..00001}}.tar", "data.sampling=epoch", "data.shuffle_buffer=64",
                 "train.batch_size=32", "train.steps=24", "checkpoint.every=100"]  # fmt: skip
    rows = read_jsonl(train_in_process(tmp_path, overrides=overrides) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25)) and rows[-1]["samples_seen"] == 3 * 256


def train_cli(tmp_path: Path, capfd, *overrides: str) -> tuple[int, str]:
    """`pretrain train` in this process (`pretrain.cli.main`, which turns errors into one line and an exit
    status): returns the status and everything written to stderr, loader worker processes included."""
    from pretrain.cli import main

    capfd.readouterr()
    with process_state_kept():
        status = main(["train", "--config", str(TINY), f"run.dir={tmp_path}", *overrides])
    return status, capfd.readouterr().err


def test_mostly_bad_data_from_workers_is_one_line_and_exit_1(tmp_path, bad_shards, capfd):
    for shard in range(3):
        write_tar(
            bad_shards / f"{shard:05d}.tar",
            [{"key": f"{shard:05d}{i:04d}", "jpg": b"x", "txt": b"x"} for i in range(16)],
        )
    status, err = train_cli(tmp_path, capfd, f"data.train={bad_shards}/{{00000..00002}}.tar", "train.batch_size=4",
                            "train.steps=5", "data.bad_window=20", "data.workers=2")  # fmt: skip
    assert status == 1
    [line] = err.strip().splitlines()[-1:]
    assert re.fullmatch(
        r"pretrain: error: 100% of the last 20 samples were bad \(data.max_bad_fraction=0.5\); shards: .*0000[0-2].tar.*"
        r" \(partition \d of 2, block from its shard #\d sample \d+\); rank 0 after 0 batches \(at the start\)",
        line,
    ), line
    assert "Traceback" not in err


def test_shards_without_any_sample_are_one_line_and_exit_1(tmp_path, capfd):
    for shard in range(2):
        write_tar(tmp_path / f"{shard:05d}.tar", [])  # no sizes.json: the count is unknown until read
    status, err = train_cli(tmp_path, capfd, f"data.train={tmp_path}/{{00000..00001}}.tar", "train.steps=2")
    assert status == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pretrain: error: none of the 2 shards holds a sample")


def test_reading_in_the_training_process_leaves_its_random_state_alone(demo_data):
    bundle = build_model(load_config(TINY).model)
    cfg = load_config(TINY, ["data.workers=0"]).data
    source = WebDatasetSource(f"{demo_data}/{SPEC}", cfg, "epoch", 0, 8, 0, 1, bundle, torch.device("cpu"))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    source.next_batch()
    assert torch.equal(torch.rand(4), expected)


LEFT_OPEN = """
import sys, torch
from pretrain.config import DataConfig
from pretrain.config_sections import ModelConfig
from pretrain.data.loader import WebDatasetSource
from pretrain.models.build import build_model

bundle = build_model(ModelConfig(name="tiny-clip"))
source = WebDatasetSource(sys.argv[1], DataConfig(workers=2), sys.argv[2], 0, 8, 0, 1, bundle, torch.device("cpu"))
sys.modules["left_open"] = sys.modules["__main__"]  # its globals live until the exit, as a script's do
source.next_batch()  # with sampling 'train': a DataError, the loader's workers running
print("left open")
"""


@pytest.mark.parametrize("sampling", ["epoch", "train"])
def test_a_loader_left_open_does_not_hold_up_the_exit(demo_data, tmp_path, sampling):
    """Workers ignore SIGTERM (the trainer stops the run), which multiprocessing's exit uses to end daemon
    processes before it waits for them: a loader nobody closed, or one an error left behind, once made the
    interpreter's exit wait forever. The exit handlers run as at a real exit (tests/forked_ranks.py)."""
    script = tmp_path / "left_open.py"
    script.write_text(LEFT_OPEN)
    proc = torchrun(1, [str(script), f"{demo_data}/train/{{00000..00003}}.tar", sampling], timeout=60)
    if sampling == "epoch":
        assert proc.returncode == 0 and proc.stdout == "left open\n", proc.stderr[-3000:]
    else:
        assert proc.returncode == 1 and "data.sampling must be one of" in proc.stderr
