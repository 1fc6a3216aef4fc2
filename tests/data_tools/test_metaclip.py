"""``data-tools metaclip`` against brute force: MetaCLIP's Algorithm 1 written out in plain Python here.

- the per-entry counts equal ``sum(entry in caption)`` over every caption (and, for ``--match words``, the
  spaced rule of MetaCLIP's released code), on demo shards and on crafted captions whose entries overlap;
- the keep list equals Algorithm 1 run pair by pair with the documented draw (blake2b + splitmix64, written
  again here) in place of ``random()``;
- head entries keep about ``t`` pairs (within an exact binomial interval computed here), tail entries keep
  every pair;
- one process, two workers, a two-rank split and a resumed job write the same keep list;
- a missing or empty entries file and ``--t 0`` are one line and exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.cli import main
from data_tools.embeddings import METADATA_SCHEMA, embedding_files
from data_tools.metaclip import MetaclipConfig, job, metaclip_job
from data_tools.phases import JobFailed
from data_tools.runner import RunnerOptions
from webshards.demo_data import write_demo_data

DEMO_ENTRIES = ["red", "green", "blue circle", "photo", "star", "background", "an", "a", "zebra", "red", ""]
OVERLAPPING = ["cat", "at", "a cat", "cat food", "Cat", "café", "food", "c", "zz", "cat", "  dog  ", ""]
CAPTIONS = [
    "a cat",
    "A Cat eats cat food",
    "category",
    "concatenate",
    "café au lait",
    "cafe",
    "",
    "at at at",
    "cat cat cat",
    "\tcat,food.",
    "zzz dog",
    "hot dog? a cat!",
]
MASK = (1 << 64) - 1


# --- the reference: Algorithm 1, pair by pair -------------------------------------------------------------


def distinct(entries: list[str]) -> list[str]:
    """The entries file's rule: stripped, empty lines ignored, repeats merged into the first."""
    return list(dict.fromkeys(e.strip() for e in entries if e.strip()))


def spaced(text: str) -> str:
    """MetaCLIP's released spacing: punctuation padded, tabs and line breaks to spaces, spaces around."""
    for mark in ",.;:?!`":
        text = text.replace(mark, f" {mark} ")
    return " " + text.replace("\t", " ").replace("\n", " ").replace("\r", " ") + " "


def matches(caption: str, entry: str, mode: str = "substring") -> bool:
    return f" {entry} " in spaced(caption) if mode == "words" else entry in caption


def brute_counts(captions: list[str], entries: list[str], mode: str = "substring") -> dict[str, int]:
    """Per entry, the captions that contain it (entries matching none left out, as in the json)."""
    counts = {e: sum(matches(c, e, mode) for c in captions) for e in entries}
    return {e: n for e, n in counts.items() if n}


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_draw(seed: int, uid: str, entry: str) -> float:
    """The documented draw of (seed, uid, entry), one pair at a time."""
    u = hashlib.blake2b(uid.encode(), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    e = hashlib.blake2b(entry.encode(), digest_size=8).digest()
    return (_mix(_mix(int.from_bytes(u, "little")) ^ int.from_bytes(e, "little")) >> 11) / 2**53


def algorithm_1(pairs: list[tuple[str, str]], entries: list[str], t: int, seed: int) -> list[str]:
    """The kept uids: a pair is kept on the first matched entry whose draw is below ``t / count``."""
    counts = brute_counts([c for _, c in pairs], entries)
    kept = []
    for uid, caption in pairs:
        for entry in (e for e in entries if e in caption):
            if reference_draw(seed, uid, entry) < min(1.0, t / counts[entry]):
                kept.append(uid)
                break
    return kept


def binomial_interval(n: int, p: float, tail: float = 1e-7) -> tuple[int, int]:
    """The exact central interval of Binomial(n, p) holding all but ``tail`` of the mass on each side."""
    pmf = [math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * math.log(p) + (n - k) * math.log1p(-p)) for k in range(n + 1)]  # fmt: skip
    low, mass = 0, pmf[0]
    while mass < tail:
        low += 1
        mass += pmf[low]
    high, mass = n, pmf[n]
    while mass < tail:
        high -= 1
        mass += pmf[high]
    return low, high


# --- inputs ------------------------------------------------------------------------------------------------


def shard_pairs(tars: list[Path]) -> list[tuple[str, str]]:
    """(uid, caption) of every sample, read straight from the tar members."""
    pairs = []
    for path in tars:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for parts in members.values():
            pairs.append((json.loads(parts["json"])["uid"], parts["txt"].decode()))
    return pairs


def write_metadata(folder: Path, shards: list[list[tuple[str | None, str]]]) -> Path:
    """An embeddings folder's metadata parquets holding the given (uid, caption) rows."""
    for index, rows in enumerate(shards):
        path = embedding_files(folder, index).metadata
        path.parent.mkdir(parents=True, exist_ok=True)
        records = [{"key": f"{index}-{j}", "uid": uid, "caption": c, "clip_score": 0.0} for j, (uid, c) in
                   enumerate(rows)]  # fmt: skip
        pq.write_table(pa.Table.from_pylist(records, schema=METADATA_SCHEMA), path)
    return folder


def write_entries(path: Path, entries: list[str]) -> Path:
    path.write_text("\n".join(entries) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[tuple[str, str]], Path]:
    """Demo shards (3 x 200 samples): their spec, their (uid, caption) pairs and an entries file."""
    root = tmp_path_factory.mktemp("metaclip-demo")
    write_demo_data(
        root / "demo", samples=600, eval_samples=0, image_size=16, samples_per_shard=200, workers=1
    )
    tars = sorted((root / "demo" / "train").glob("*.tar"))
    spec = str(root / "demo" / "train" / "{00000..00002}.tar")
    return spec, shard_pairs(tars), write_entries(root / "entries.txt", DEMO_ENTRIES)


def run_cli(*args: str) -> int:
    return main(["metaclip", *map(str, args)])


def report(keep: Path) -> dict:
    return json.loads(keep.with_name(keep.stem + "_entry_counts.json").read_text())


def kept(keep: Path) -> list[str]:
    return pq.read_table(keep)["uid"].to_pylist()


# --- tests -------------------------------------------------------------------------------------------------


def test_demo_counts_and_keep_list_equal_algorithm_1(demo, tmp_path: Path) -> None:
    spec, pairs, entries = demo
    keep = tmp_path / "keep.parquet"
    assert run_cli("--shards", spec, "--entries", entries, "--t", 40, "--seed", 3, "--output", keep) == 0
    found, names = report(keep), distinct(DEMO_ENTRIES)
    before = {e: c["before"] for e, c in found["entry_counts"].items()}
    assert before == brute_counts([c for _, c in pairs], names)
    expected = algorithm_1(pairs, names, t=40, seed=3)
    assert kept(keep) == expected
    kept_captions = [c for uid, c in pairs if uid in set(expected)]
    assert {e: c["after"] for e, c in found["entry_counts"].items() if c["after"]} == brute_counts(
        kept_captions, names
    )
    matched = sum(any(e in c for e in names) for _, c in pairs)
    assert (found["pool"], found["matched"], found["unmatched"]) == (600, matched, 600 - matched)
    assert found["duplicate_entries_merged"] == 1 and found["entries"] == len(names)
    assert keep.with_name("keep_entry_counts.png").read_bytes()[:4] == b"\x89PNG"
    assert not keep.with_name("keep_work").exists()  # scratch removed after the merge


@pytest.mark.parametrize("mode", ["substring", "words"])
def test_overlapping_entries_counted_exactly(mode: str, tmp_path: Path) -> None:
    rows = [(f"{i:032x}", c) for i, c in enumerate(CAPTIONS)] + [(None, "a cat without uid")]
    folder = write_metadata(tmp_path / "emb", [rows[:5], [], rows[5:]])
    keep, entries = tmp_path / "keep.parquet", write_entries(tmp_path / "entries.txt", OVERLAPPING)
    assert (
        run_cli("--embeddings", folder, "--entries", entries, "--t", 1, "--match", mode, "--output", keep)
        == 0
    )
    found = report(keep)
    before = {e: c["before"] for e, c in found["entry_counts"].items()}
    assert before == brute_counts(CAPTIONS, distinct(OVERLAPPING), mode)
    assert found["no_uid"] == 1 and found["duplicate_entries_merged"] == 1
    for entry, counts in found["entry_counts"].items():
        assert counts["probability"] == pytest.approx(min(1.0, 1 / counts["before"])), entry


def test_head_entries_capped_tail_entries_whole(tmp_path: Path) -> None:
    """alpha: 6,000 pairs of its own + 300 shared with the tail entry gamma; beta 1,500; delta 40; t = 500."""
    captions = [f"alpha {i}" for i in range(6000)] + [f"beta {i}" for i in range(1500)]
    captions += [f"gamma and alpha {i}" for i in range(300)] + [f"delta {i}" for i in range(40)]
    captions += [f"nothing {i}" for i in range(200)]
    rows = [(f"{i:032x}", c) for i, c in enumerate(captions)]
    folder = write_metadata(tmp_path / "emb", [rows[i::3] for i in range(3)])
    entries = write_entries(tmp_path / "entries.txt", ["alpha", "beta", "gamma", "delta"])
    for seed in (0, 1, 2):  # the match and count phases are reused; only the draws run again
        keep = tmp_path / f"keep{seed}.parquet"
        cfg = MetaclipConfig(str(entries), t=500, seed=seed)
        metaclip_job([str(p) for p in sorted(folder.glob("metadata/*"))], keep, cfg, RunnerOptions(workers=1))
        counts, uids = report(keep)["entry_counts"], set(kept(keep))
        assert {e: c["before"] for e, c in counts.items()} == {"alpha": 6300, "beta": 1500, "gamma": 300,
                                                               "delta": 40}  # fmt: skip
        assert counts["gamma"]["after"] == 300 and counts["delta"]["after"] == 40  # tail: every pair kept
        low, high = binomial_interval(6000, 500 / 6300)  # alpha's own pairs, each kept with p = t / 6300
        assert low <= counts["alpha"]["after"] - 300 <= high
        low, high = binomial_interval(1500, 500 / 1500)
        assert low <= counts["beta"]["after"] <= high
        assert not any(uid in uids for uid, c in rows if c.startswith("nothing"))


def test_same_keep_list_for_workers_ranks_and_resume(demo, tmp_path: Path, monkeypatch) -> None:
    spec, _, entries = demo
    args = ("--shards", spec, "--entries", entries, "--t", 25)
    assert run_cli(*args, "--output", tmp_path / "one.parquet") == 0
    reference = (tmp_path / "one.parquet").read_bytes()
    assert run_cli(*args, "--workers", 2, "--output", tmp_path / "two.parquet") == 0
    assert (tmp_path / "two.parquet").read_bytes() == reference

    ranks = [threading.Thread(target=run_cli, args=(*args, "--rank", r, "--world", 2, "--output",
                                                     tmp_path / "ranks.parquet")) for r in (0, 1)]  # fmt: skip
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join(timeout=120)
    assert (tmp_path / "ranks.parquet").read_bytes() == reference

    def fails_on_shard_1(task):  # a task dies mid-job: the job fails, its finished work stays
        if task.name == "draw:1":
            raise OSError("killed")
        return draw(task)

    draw = job.draw_task
    monkeypatch.setattr(job, "draw_task", fails_on_shard_1)
    cfg, resumed = MetaclipConfig(str(entries), t=25), tmp_path / "resumed.parquet"
    urls = [spec.replace("{00000..00002}", f"{i:05d}") for i in range(3)]
    with pytest.raises(JobFailed, match="draw:1"):
        metaclip_job(urls, resumed, cfg, RunnerOptions())
    monkeypatch.setattr(job, "draw_task", draw)
    assert len(list((tmp_path / "resumed_work").rglob("draw-*/*.json"))) == 2
    metaclip_job(urls, resumed, cfg, RunnerOptions())
    assert resumed.read_bytes() == reference


@pytest.mark.parametrize(
    ("entries", "t", "message"),
    [
        (None, "5", "entries file not found"),
        ("\n  \n\n", "5", "holds no entry"),
        ("cat\n", "0", "argument --t: must be at least 1, got 0"),
    ],
)
def test_bad_input_is_one_line(entries, t, message, demo, tmp_path: Path, capsys) -> None:
    path = tmp_path / "entries.txt"
    if entries is not None:
        path.write_text(entries)
    status = run_cli("--shards", demo[0], "--entries", path, "--t", t, "--output", tmp_path / "k.parquet")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err
