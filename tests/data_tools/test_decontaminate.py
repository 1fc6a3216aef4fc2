"""data-tools decontaminate: planted copies of eval images (byte copy, resized, re-encoded, cropped) are
found by the methods that should find them, a clean pool loses nothing, a 2-rank split equals one node.

Expected matches come from references outside the code under test: the bytes themselves (exact),
imagehash's pHash distance computed here (perceptual), and cosine similarities of open_clip embeddings
computed here (semantic)."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import imagehash
import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import ROOT
from PIL import Image

from data_tools.cli import main
from data_tools.decontam import DecontamConfig, decontaminate
from data_tools.embeddings import METADATA_SCHEMA, embedding_files
from data_tools.runner import RunnerOptions
from webshards.layout import ShardWriter, key_for
from webshards.spec import expand_urls

EVAL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
OTHER_PHOTOS = ("coins", "moon", "hubble_deep_field", "immunohistochemistry", "clock")
PLANTS = ("copy", "resized", "reencoded", "cropped")  # of eval photos 0..3; photo 4 is never planted
BITS = 10  # dedup's default threshold


def photo(name: str) -> Image.Image:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    image.thumbnail((160, 160))
    return image


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def planted(kind: str, original: bytes) -> bytes:
    """A copy of an eval image: its bytes, resized 0.5x, re-encoded at quality 60, or a 90% centre crop."""
    image = Image.open(io.BytesIO(original)).convert("RGB")
    w, h = image.size
    if kind == "copy":
        return original
    if kind == "resized":
        return jpeg(image.resize((w // 2, h // 2), Image.BICUBIC))
    if kind == "reencoded":
        return jpeg(image, quality=60)
    return jpeg(image.crop((w // 20, h // 20, w - w // 20, h - h // 20)))


def clean_images() -> list[bytes]:
    """Photographs that are not in the eval set, and quarter crops of them: 25 images."""
    images = []
    for name in OTHER_PHOTOS:
        image = photo(name)
        w, h = image.size
        images.append(jpeg(image))
        images += [jpeg(image.crop((x, y, x + w // 2, y + h // 2))) for x in (0, w // 2) for y in (0, h // 2)]
    return images


def write_shards(folder: Path, images: list[bytes], shards: int = 2) -> str:
    """``images`` round-robin into ``shards`` tars; returns the spec."""
    for shard in range(shards):
        with ShardWriter(folder, shard) as writer:
            for index, data in enumerate(images[shard::shards]):
                writer.add(
                    key_for(shard, index), data, f"image {shard}/{index}", {"path": f"{shard}/{index}"}
                )
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An eval set of 5 photos (via data-tools eval-set), a pool with the 4 plants among 25 clean images,
    and a clean pool of the 25 alone."""
    root = tmp_path_factory.mktemp("decontam")
    originals = {name: jpeg(photo(name)) for name in EVAL_PHOTOS}
    for i, (name, data) in enumerate(originals.items()):
        (root / "tree" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "tree" / f"class{i % 2}" / f"{name}.jpg").write_bytes(data)
    assert main(["eval-set", "--input", str(root / "tree"), "--output", str(root / "eval")]) == 0
    clean = clean_images()
    plants = [planted(kind, originals[name]) for kind, name in zip(PLANTS, EVAL_PHOTOS)]
    pool = clean[:10] + plants + clean[10:]
    return {
        "root": root,
        "eval": str(root / "eval"),
        "originals": originals,
        "plants": dict(zip(PLANTS, plants)),
        "pool": write_shards(root / "pool", pool),
        "clean": write_shards(root / "clean", clean),
        "pool_images": pool,
    }


def run(world: dict, out: Path, method: str, pool: str = "pool", *extra: str) -> dict:
    args = ["decontaminate", "--shards", world[pool], "--eval-set", world["eval"], "--method", method]
    assert main([*args, "--output", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())


def kept(out: Path) -> list[str]:
    return pq.read_table(out / "keep.parquet")["uid"].to_pylist()


def pool_uids(spec: str) -> dict[str, bytes]:
    """uid -> image bytes of every sample, read back from the shards with webdataset's reader."""
    import webdataset as wds

    with wds.WebDataset(expand_urls(spec), shardshuffle=False).to_tuple("json", "jpg") as samples:
        return {json.loads(meta)["uid"]: data for meta, data in samples}


def removed_images(world: dict, out: Path, pool: str = "pool") -> set[bytes]:
    images = pool_uids(world[pool])
    return {data for uid, data in images.items() if uid not in set(kept(out))}


def phash_distance(a: bytes, b: bytes) -> int:
    """imagehash's own pHash distance (the reference for the perceptual method)."""
    return imagehash.phash(Image.open(io.BytesIO(a)).convert("L")) - imagehash.phash(
        Image.open(io.BytesIO(b)).convert("L")
    )


def test_exact_finds_the_byte_copy_only(world: dict, tmp_path: Path) -> None:
    report = run(world, tmp_path, "exact")
    assert removed_images(world, tmp_path) == {world["plants"]["copy"]}
    (found,) = report["eval_sets"]
    assert (found["images"], found["images_in_training"], found["training_removed"]) == (5, 1, 1)
    example = found["examples"][0]
    assert example["eval"]["key"] == "s0000000" and example["distance"] == 0  # astronaut: class0, first
    assert example["train"]["shard"].endswith(".tar") and example["train"]["uid"] not in kept(tmp_path)
    assert (tmp_path / "examples.png").is_file()
    assert report["items"] == 29 and len(kept(tmp_path)) == 28


def test_perceptual_finds_what_imagehash_says_is_within_the_threshold(world: dict, tmp_path: Path) -> None:
    report = run(world, tmp_path, "perceptual")
    original = dict(zip(PLANTS, EVAL_PHOTOS))
    close = {
        k
        for k, data in world["plants"].items()
        if phash_distance(data, world["originals"][original[k]]) <= BITS
    }
    assert {
        "copy",
        "resized",
        "reencoded",
    } <= close  # what pHash is for; the 90% crop is measured, not assumed
    expected = {world["plants"][k] for k in close}
    assert removed_images(world, tmp_path) == expected
    (found,) = report["eval_sets"]
    assert found["images_in_training"] == len(close) == found["training_removed"]
    assert all(e["distance"] <= BITS for e in found["examples"])


@pytest.mark.parametrize("method", ["exact", "perceptual"])
def test_a_clean_pool_loses_nothing(world: dict, tmp_path: Path, method: str) -> None:
    report = run(world, tmp_path, method, "clean")
    assert report["removed"] == 0 and len(kept(tmp_path)) == 25
    assert report["eval_sets"][0]["images_in_training"] == 0 and not (tmp_path / "examples.png").exists()


def test_two_ranks_write_what_one_node_writes(world: dict, tmp_path: Path) -> None:
    urls, cfg = expand_urls(world["pool"]), DecontamConfig("perceptual")
    decontaminate(tmp_path / "one", urls, [world["eval"]], cfg, RunnerOptions(rank=0, world=1))
    reports = [None, None]

    def rank(r: int) -> None:
        options = RunnerOptions(rank=r, world=2, phase_timeout=60)
        reports[r] = decontaminate(tmp_path / "two", urls, [world["eval"]], cfg, options)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert reports[1] is None and reports[0]["removed"] > 0
    assert kept(tmp_path / "one") == kept(tmp_path / "two")
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert {k: v for k, v in one.items() if k != "seconds"} == {
        k: v for k, v in reports[0].items() if k != "seconds"
    }
    assert not (tmp_path / "two" / "decontam-work").exists()


# ---- semantic ----------------------------------------------------------------------------------------
def reference_embeddings(images: list[bytes]) -> np.ndarray:
    """tiny-clip's (seed 0) L2-normalised image embeddings, by open_clip alone."""
    open_clip.add_model_config(ROOT / "configs" / "models")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip")
    batch = torch.stack([preprocess(Image.open(io.BytesIO(data)).convert("RGB")) for data in images])
    with torch.no_grad():
        features = model.eval().encode_image(batch)
    return torch.nn.functional.normalize(features, dim=-1).numpy()


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-clip export folder (random weights, seed 0): the model the embeddings record."""
    from helpers import write_export

    torch.manual_seed(0)
    return write_export(tmp_path_factory.mktemp("export") / "tiny-clip")


def test_semantic_with_the_real_model(world: dict, export: Path, tmp_path: Path, capsys) -> None:
    """The wiring: embed (which records its model), then eval images embedded with that model. A random
    tiny-clip is not discriminative (distinct photos reach cosine 0.986), so only at 0.999 does it separate
    the plants from the clean images; which plants it finds there is what the docs' table says."""
    for pool in ("pool", "clean"):
        emb = ["--model", str(export), "--output", str(tmp_path / f"emb-{pool}")]
        assert main(["embed", "--shards", world[pool], *emb]) == 0
    args = ("--threshold", "0.999", "--embeddings")
    report = run(world, tmp_path / "out", "semantic", "pool", *args, str(tmp_path / "emb-pool"))
    found = {k for k, data in world["plants"].items() if data in removed_images(world, tmp_path / "out")}
    assert found == {"copy", "resized", "reencoded", "cropped"}, report
    assert report["eval_sets"][0]["examples"][0]["similarity"] > 0.999
    clean = run(world, tmp_path / "clean", "semantic", "clean", *args, str(tmp_path / "emb-clean"))
    assert clean["removed"] == 0 and len(kept(tmp_path / "clean")) == 25
    capsys.readouterr()
    other = [
        "embed",
        "--shards",
        world["pool"],
        "--model",
        "tiny-clip",
        "--output",
        str(tmp_path / "emb-pool"),
    ]
    assert main(other) == 2 and "holds embeddings with other settings (model" in capsys.readouterr().err


def planted_vectors(anchors: np.ndarray, cosines: list[float], others: int) -> np.ndarray:
    """One unit vector at each cosine to its anchor (anchor i for cosine i), then ``others`` random ones."""
    rng = np.random.default_rng(0)
    rows = []
    for anchor, cosine in zip(anchors, cosines):
        away = rng.normal(size=anchor.shape)
        away -= (away @ anchor) * anchor
        rows.append(cosine * anchor + np.sqrt(1 - cosine**2) * away / np.linalg.norm(away))
    random = rng.normal(size=(others, anchors.shape[1]))
    rows += list(random / np.linalg.norm(random, axis=1, keepdims=True))
    return np.array(rows, dtype=np.float32)


def write_embeddings(folder: Path, vectors: np.ndarray, model: Path) -> None:
    """``vectors`` as embed's layout in two shards, with embed.json naming ``model``."""
    for shard, rows in enumerate(np.array_split(np.arange(len(vectors)), 2)):
        files = embedding_files(folder, shard)
        for path in (files.image, files.metadata):
            path.parent.mkdir(parents=True, exist_ok=True)
        np.save(files.image, vectors[rows].astype(np.float16))
        meta = [{"key": f"k{i}", "uid": f"{i:032x}", "caption": "", "clip_score": 0.0} for i in rows]
        pq.write_table(pa.Table.from_pylist(meta, schema=METADATA_SCHEMA), files.metadata)
    (folder / "embed.json").write_text(json.dumps({"model": str(model), "pretrained": None}))


def test_semantic_finds_planted_near_vectors(world: dict, export: Path, tmp_path: Path) -> None:
    """Training embeddings planted at known cosines to the eval images' own (computed here by open_clip):
    exactly the training rows above the threshold are removed (brute force over all pairs); among random
    vectors, nothing is."""
    anchors = reference_embeddings(list(world["originals"].values()))
    vectors = planted_vectors(anchors, [0.999, 0.997, 0.98, 0.9], others=26)
    cosines = vectors.astype(np.float16).astype(np.float32) @ anchors.T
    threshold = 0.99  # the random tiny-clip puts distinct photos at cosines up to 0.986
    assert np.abs(cosines - threshold).min() > 0.003  # no pair so close that rounding could flip it
    write_embeddings(tmp_path / "emb", vectors, export)
    args = ("--embeddings", str(tmp_path / "emb"), "--threshold", str(threshold))
    report = run(world, tmp_path / "out", "semantic", "pool", *args)
    removed = {f"{i:032x}" for i in np.flatnonzero((cosines > threshold).any(axis=1))}
    assert removed == {f"{i:032x}" for i in range(30)} - set(kept(tmp_path / "out"))
    assert removed == {f"{i:032x}" for i in range(2)}  # the 0.98 and 0.9 plants and the random ones stay
    (found,) = report["eval_sets"]
    assert found["images_in_training"] == int((cosines > threshold).any(axis=0).sum())
    assert found["training_removed"] == 2 and found["examples"][0]["similarity"] > 0.99


def test_one_line_errors(world: dict, tmp_path: Path, capsys) -> None:
    base = ["decontaminate", "--shards", world["pool"], "--output", str(tmp_path / "out")]
    cases = [
        (["--eval-set", str(tmp_path / "nowhere"), "--method", "exact"], "nowhere"),
        (["--eval-set", world["eval"], "--method", "semantic"], "needs --embeddings"),
        (
            ["--eval-set", world["eval"], "--method", "semantic", "--embeddings", str(tmp_path)],
            "embed.json not found",
        ),
        (["--eval-set", world["eval"], "--method", "perceptual", "--threshold", "40"], "0..32 bits"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and err[0].startswith("data-tools: error:"), err
    assert not (tmp_path / "out").exists()


def test_a_plain_image_folder_is_an_eval_set(world: dict, tmp_path: Path) -> None:
    args = ["--shards", world["pool"], "--eval-set", str(world["root"] / "tree"), "--method", "exact"]
    assert main(["decontaminate", *args, "--output", str(tmp_path)]) == 0
    (found,) = json.loads((tmp_path / "report.json").read_text())["eval_sets"]
    assert found["kind"] == "folder" and found["images_in_training"] == 1
    assert found["examples"][0]["eval"]["path"] == str(world["root"] / "tree" / "class0" / "astronaut.jpg")


def test_band_index_finds_exactly_the_brute_force_pairs() -> None:
    """dedup's band search with the eval hashes as the index: every (query, item) pair within the
    threshold, checked against all pairs."""
    from data_tools.dedup.perceptual import BandIndex

    rng = np.random.default_rng(3)
    items = rng.integers(0, 2**63, 500, dtype=np.uint64) << np.uint64(1)
    queries = rng.integers(0, 2**63, 800, dtype=np.uint64) << np.uint64(1)
    for i in range(0, 400, 2):  # queries at 0..14 bits from an item
        flips = rng.choice(64, int(rng.integers(0, 15)), replace=False)
        queries[i] = items[i // 2] ^ np.uint64(sum(1 << int(b) for b in flips))
    distance = np.array([[bin(int(q ^ x)).count("1") for x in items] for q in queries])
    for bits in (0, 4, 10, 14):
        assert np.array_equal(BandIndex(items, bits).query(queries), np.argwhere(distance <= bits))
