"""data-tools dedup: exact and perceptual on real photographs with planted copies, semantic against brute force."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from data_tools.cli import main
from data_tools.dedup import DedupConfig, find_duplicates
from data_tools.dedup.groups import choose_keep, connected_components, group_ids
from data_tools.dedup.perceptual import near_pairs
from data_tools.embeddings import METADATA_SCHEMA, embedding_files
from data_tools.runner import RunnerOptions
from webshards.layout import ShardWriter, key_for
from webshards.spec import expand_urls

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "hubble_deep_field")
PHOTOS += ("immunohistochemistry", "clock")
COPIES_PER_PHOTO = 12  # 3 each of: re-encoded, resized, cropped, brightened


def photo(name: str) -> Image.Image:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")  # grey photos become RGB
    image.thumbnail((480, 480))
    return image


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def modified(image: Image.Image, kind: int, rng: np.random.Generator) -> bytes:
    """A re-encoded (q 60-95), resized (0.5-0.9x), cropped (<= 5%) or brightened (+-10%) copy."""
    if kind == 0:
        return jpeg(image, int(rng.integers(60, 96)))
    if kind == 1:
        scale = rng.uniform(0.5, 0.9)
        return jpeg(image.resize((int(image.width * scale), int(image.height * scale)), Image.BICUBIC))
    if kind == 2:
        cut = rng.uniform(0.01, 0.05)
        dx, dy = int(cut * image.width), int(cut * image.height)
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        return jpeg(image.crop((left, top, image.width - dx + left, image.height - dy + top)))
    return jpeg(ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, tuple[str, str]]]:
    """Two shards of 10 photographs, 2 byte-identical and 12 modified copies of each, shuffled.

    Returns the shard spec and uid -> (photo, kind) with kind original / identical / modified.
    """
    rng = np.random.default_rng(0)
    samples = []
    for name in PHOTOS:
        image = photo(name)
        original = jpeg(image, quality=97)  # outside the re-encoding range: no copy has its bytes
        samples += [(name, "original", original)] + [(name, "identical", original)] * 2
        samples += [(name, "modified", modified(image, i % 4, rng)) for i in range(COPIES_PER_PHOTO)]
    order = rng.permutation(len(samples))
    out = tmp_path_factory.mktemp("photos")
    truth = {}
    for shard in range(2):
        with ShardWriter(out, shard) as writer:
            for index, i in enumerate(order[shard::2]):
                name, kind, data = samples[i]
                record = writer.add(
                    key_for(shard, index), data, f"a photo: {name}", {"path": f"{i}/{name}.jpg"}
                )
                truth[record["uid"]] = (name, kind)
    return f"{out}/{{00000..00001}}.tar", truth


def read_groups(output: Path) -> tuple[dict[int, list[str]], pa.Table]:
    table = pq.read_table(output / "duplicates.parquet")
    groups = defaultdict(list)
    for uid, group in zip(table["uid"].to_pylist(), table["group"].to_pylist()):
        if group >= 0:
            groups[group].append(uid)
    return dict(groups), table


def check_outputs(output: Path) -> None:
    """The contract: one kept per group, every ungrouped item kept, keep.parquet = kept uids, a report."""
    groups, table = read_groups(output)
    keep = dict(zip(table["uid"].to_pylist(), table["keep"].to_pylist()))
    assert all(sum(keep[u] for u in members) == 1 for members in groups.values())
    assert all(k for u, k, g in zip(*(table[c].to_pylist() for c in ("uid", "keep", "group"))) if g < 0)
    assert pq.read_table(output / "keep.parquet")["uid"].to_pylist() == [u for u, k in keep.items() if k]
    report = json.loads((output / "report.json").read_text())
    sizes = {str(n): sum(len(m) == n for m in groups.values()) for n in {len(m) for m in groups.values()}}
    assert report["group_sizes"] == sizes and report["items"] == table.num_rows
    assert report["removed"] == sum(len(m) - 1 for m in groups.values())


def test_exact_groups_byte_identical_copies(photos, tmp_path: Path) -> None:
    spec, truth = photos
    find_duplicates(tmp_path, DedupConfig("exact"), RunnerOptions(), shard_urls=expand_urls(spec))
    groups, table = read_groups(tmp_path)
    assert table.num_rows == len(truth)
    found = {frozenset(m) for m in groups.values()}
    for name in PHOTOS:  # every original is grouped with exactly its byte-identical copies
        same = frozenset(u for u, (n, kind) in truth.items() if n == name and kind != "modified")
        assert same in found
    assert all(len({truth[u][0] for u in members}) == 1 for members in found)
    check_outputs(tmp_path)


def test_perceptual_groups_modified_copies_and_never_two_photos(photos, tmp_path: Path) -> None:
    spec, truth = photos
    assert main(["dedup", "--shards", spec, "--method", "perceptual", "--output", str(tmp_path)]) == 0
    groups, _ = read_groups(tmp_path)
    for members in groups.values():
        assert len({truth[u][0] for u in members}) == 1, "two distinct photographs grouped"
    group_of = {u: g for g, members in groups.items() for u in members}
    originals = {truth[u][0]: group_of.get(u) for u in truth if truth[u][1] == "original"}
    copies = [u for u in truth if truth[u][1] == "modified"]
    found = sum(group_of.get(u) is not None and group_of.get(u) == originals[truth[u][0]] for u in copies)
    assert found >= 0.9 * len(copies), f"only {found} of {len(copies)} modified copies found"
    check_outputs(tmp_path)


def test_hashes_are_reused_on_rerun(photos, tmp_path: Path) -> None:
    spec, _ = photos
    urls = expand_urls(spec)[:1]
    find_duplicates(tmp_path, DedupConfig("perceptual"), RunnerOptions(), shard_urls=urls)
    features = next((tmp_path / "features" / "perceptual").glob("*.parquet"))
    stamp = features.stat().st_mtime_ns
    report = find_duplicates(
        tmp_path, DedupConfig("perceptual", threshold=4), RunnerOptions(), shard_urls=urls
    )
    assert features.stat().st_mtime_ns == stamp and report["threshold_bits"] == 4


def test_exact_with_caption_and_keep_largest(tmp_path: Path) -> None:
    big, small = jpeg(photo("coffee")), jpeg(photo("coffee").resize((120, 80)))
    with ShardWriter(tmp_path / "shards", 0) as writer:
        for i, (data, caption) in enumerate(
            [(small, "A cup"), (big, "a  cup "), (big, "a cup"), (big, "a mug")]
        ):
            writer.add(key_for(0, i), data, caption, {"path": str(i)})
    urls = [str(tmp_path / "shards" / "00000.tar")]
    find_duplicates(tmp_path / "a", DedupConfig("exact", with_caption=True), RunnerOptions(), shard_urls=urls)
    assert pq.read_table(tmp_path / "a" / "duplicates.parquet")["group"].to_pylist() == [-1, 0, 0, -1]
    find_duplicates(
        tmp_path / "b", DedupConfig("perceptual", keep_policy="largest"), RunnerOptions(), shard_urls=urls
    )
    table = pq.read_table(tmp_path / "b" / "duplicates.parquet")
    assert table["group"].to_pylist() == [0, 0, 0, 0] and table["keep"].to_pylist() == [
        False,
        True,
        False,
        False,
    ]


def test_empty_shards(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "shards", 0):
        pass
    for method in ("exact", "perceptual"):
        report = find_duplicates(
            tmp_path / method,
            DedupConfig(method),
            RunnerOptions(),
            shard_urls=[str(tmp_path / "shards/00000.tar")],
        )
        assert report["items"] == 0 and pq.read_table(tmp_path / method / "keep.parquet").num_rows == 0


BITS_IN_BYTE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_all_pairs(hashes: np.ndarray) -> np.ndarray:
    """Brute force, independent of the code under test: bits set in every pairwise XOR, via a byte table."""
    xor = (hashes[:, None] ^ hashes[None, :]).view(np.uint8).reshape(len(hashes), len(hashes), 8)
    return BITS_IN_BYTE[xor].sum(axis=-1, dtype=np.uint8)


def test_band_index_finds_exactly_the_brute_force_pairs() -> None:
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, 3000, dtype=np.uint64) << np.uint64(1)
    for i in range(0, 600, 2):  # plant neighbours at 0..14 bits
        flips = rng.choice(64, int(rng.integers(0, 15)), replace=False)
        hashes[i + 1] = hashes[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    distance = hamming_all_pairs(hashes)
    for threshold in (0, 1, 4, 10, 14):
        brute = np.argwhere(np.triu(distance <= threshold, 1))
        assert np.array_equal(near_pairs(hashes, threshold), brute)


def test_components_and_keep_policy() -> None:
    labels = connected_components(8, np.array([[5, 6], [0, 3], [3, 7], [2, 1]]))
    groups = group_ids(labels)
    assert groups.tolist() == [0, 1, 1, 0, -1, 2, 2, 0]
    keep = choose_keep(groups, np.array([0, 5, 5, 9, 0, 1, 2, 3], dtype=float))
    assert keep.tolist() == [False, True, False, True, True, False, True, False]  # ties: first


def write_embeddings(folder: Path, vectors: np.ndarray) -> None:
    """``vectors`` as fp16 image embeddings in two shards; clip_score of row i is i % 7."""
    for shard, rows in enumerate(np.array_split(np.arange(len(vectors)), 2)):
        files = embedding_files(folder, shard)
        for path in (files.image, files.metadata):
            path.parent.mkdir(parents=True, exist_ok=True)
        np.save(files.image, vectors[rows].astype(np.float16))
        meta = [{"key": f"k{i}", "uid": f"{i:032x}", "caption": "", "clip_score": float(i % 7)} for i in rows]
        pq.write_table(pa.Table.from_pylist(meta, schema=METADATA_SCHEMA), files.metadata)


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def planted_embeddings(folder: Path, n: int = 2000, dim: int = 64, copies: int = 50) -> np.ndarray:
    """``n`` random unit vectors and ``copies`` near-copies (cosine ~0.98), shuffled; returns them all."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n, dim))
    near = base[rng.choice(n, copies, replace=False)] + rng.normal(scale=0.2, size=(copies, dim))
    vectors = unit(np.concatenate([base, near])[rng.permutation(n + copies)]).astype(np.float16)
    write_embeddings(folder, vectors)
    return vectors


def brute_force_groups(vectors: np.ndarray, eps: float) -> set[frozenset[int]]:
    """The reference, sharing no code with the method: every pair with cosine above ``1 - eps``, then the
    groups those pairs connect (a plain union-find), as sets of row indices."""
    unit = vectors.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    parent = list(range(len(unit)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in np.argwhere(np.triu(unit @ unit.T > 1 - eps, 1)).tolist():
        parent[root(a)] = root(b)
    members = defaultdict(set)
    for i in range(len(unit)):
        members[root(i)].add(i)
    return {frozenset(m) for m in members.values() if len(m) > 1}


@pytest.mark.parametrize("clusters, probes", [(None, 3), (40, 2), (40, 40)])
def test_semantic_equals_brute_force(tmp_path: Path, clusters: int | None, probes: int) -> None:
    vectors = planted_embeddings(tmp_path / "emb")
    eps = 0.05
    cfg = DedupConfig("semantic", threshold=eps, keep_policy="score", clusters=clusters, probes=probes)
    report = find_duplicates(tmp_path / "out", cfg, RunnerOptions(), embeddings=tmp_path / "emb")
    table = pq.read_table(tmp_path / "out" / "duplicates.parquet")
    groups = np.array(table["group"].to_pylist())
    found = {frozenset(np.flatnonzero(groups == g).tolist()) for g in range(groups.max() + 1)}
    expected = brute_force_groups(vectors, eps)
    assert len(expected) == 50 and found == expected  # all pairs vs. clustered search
    # Probing every cluster is exhaustive, so the report must call the result exact (with 2050 items and no
    # cluster count given, k-means uses ceil(2050 / 1000) = 3 clusters).
    assert report["exact"] or probes < (clusters or 3)
    scores = np.arange(len(groups)) % 7  # keep policy "score": the highest clip_score of each group is kept
    kept = np.array(table["keep"].to_pylist())
    assert all(scores[kept & (groups == g)][0] == scores[groups == g].max() for g in range(groups.max() + 1))
    check_outputs(tmp_path / "out")
    assert not (tmp_path / "out" / "semantic-work").exists()


def test_semantic_finds_pairs_straddling_a_cluster_boundary(tmp_path: Path) -> None:
    """Two blobs and one near-duplicate pair on the border between them, one item on each side."""
    rng = np.random.default_rng(0)
    axes = np.eye(16)
    blobs = [unit(axes[i] + rng.normal(scale=0.1, size=(300, 16))) for i in (0, 1)]
    middle = unit(axes[0] + axes[1])
    pair = unit(np.stack([middle + 0.03 * (axes[0] - axes[1]), middle - 0.03 * (axes[0] - axes[1])]))
    vectors = np.concatenate([blobs[0], pair, blobs[1]]).astype(np.float16)
    write_embeddings(tmp_path / "emb", vectors)
    expected = brute_force_groups(vectors, 0.01)
    assert frozenset({300, 301}) in expected
    for probes, exact in ((1, False), (2, True)):
        cfg = DedupConfig("semantic", threshold=0.01, clusters=2, probes=probes)
        report = find_duplicates(tmp_path / f"out{probes}", cfg, RunnerOptions(), embeddings=tmp_path / "emb")
        groups = np.array(
            pq.read_table(tmp_path / f"out{probes}" / "duplicates.parquet")["group"].to_pylist()
        )
        found = {frozenset(np.flatnonzero(groups == g).tolist()) for g in range(groups.max() + 1)}
        assert report["exact"] is exact and (found == expected) is exact  # one probe misses the pair


def test_cli_help_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["dedup", "--help"]) == 0 and "--keep-policy" in capsys.readouterr().out
    base = ["dedup", "--output", str(tmp_path)]
    assert main([*base, "--method", "fuzzy", "--shards", "x.tar"]) == 2
    assert main([*base, "--method", "semantic"]) == 2  # needs --embeddings
    assert main([*base, "--method", "exact", "--keep-policy", "score", "--shards", "x.tar"]) == 2
    err = capsys.readouterr().err
    assert err.count("data-tools: error:") == 3 and "Traceback" not in err
