"""data-tools embed: the clip-retrieval layout, dtypes, normalisation, alignment, resume, model sources."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY
from PIL import Image

from data_tools.cli import main
from data_tools.embed import EmbedConfig, embed_shards, load_embedder
from data_tools.embeddings import embedding_files, metadata_files
from webshards.layout import ShardWriter, iter_shard, key_for


def demo_urls(demo_data: Path, count: int = 2) -> list[str]:
    return [str(demo_data / "train" / f"{i:05d}.tar") for i in range(count)]


@pytest.fixture(scope="module")
def embedded(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embeddings")
    summary = embed_shards(demo_urls(demo_data), out, EmbedConfig("tiny-clip", batch_size=50))
    assert summary.ok() and summary.samples == 256
    return out


def test_layout_dtypes_and_normalisation(embedded: Path, demo_data: Path) -> None:
    for i, url in enumerate(demo_urls(demo_data)):
        files = embedding_files(embedded, i)
        image, text = np.load(files.image), np.load(files.text)
        meta = pq.read_table(files.metadata)
        assert image.dtype == text.dtype == np.float16
        assert image.shape == text.shape == (128, 128) and meta.num_rows == 128
        for emb in (image, text):
            np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
        samples = list(iter_shard(url))  # rows are aligned with the shard's samples, in order
        assert meta["key"].to_pylist() == [s["__key__"] for s in samples]
        assert meta["uid"].to_pylist() == [s["json"]["uid"] for s in samples]
        assert meta["caption"].to_pylist() == [s["txt"] for s in samples]
        cosine = (image.astype(np.float32) * text.astype(np.float32)).sum(axis=1)
        np.testing.assert_allclose(meta["clip_score"].to_numpy(), cosine, atol=5e-3)
    assert [p.name for p in metadata_files(embedded)] == ["metadata_0.parquet", "metadata_1.parquet"]


def test_embeddings_match_the_model(embedded: Path, demo_data: Path) -> None:
    bundle = load_embedder("tiny-clip", None, "cpu")
    sample = next(iter_shard(demo_urls(demo_data)[0]))
    image = bundle.preprocess_val(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))[None]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(bundle.model.encode_image(image), dim=-1)[0].numpy()
    np.testing.assert_allclose(np.load(embedding_files(embedded, 0).image)[0], expected, atol=2e-3)


def test_rerun_skips_complete_shards(demo_data: Path, tmp_path: Path) -> None:
    cfg = EmbedConfig("tiny-clip", batch_size=64)
    embed_shards(demo_urls(demo_data), tmp_path, cfg)
    first = embedding_files(tmp_path, 0).metadata.stat().st_mtime_ns
    redo = embedding_files(tmp_path, 1)
    before = np.load(redo.image)
    redo.metadata.unlink()  # as if killed before shard 1's marker was written
    summary = embed_shards(demo_urls(demo_data), tmp_path, cfg)
    assert len(summary.skipped) == 1 and len(summary.done) == 1 and summary.samples == 128
    assert embedding_files(tmp_path, 0).metadata.stat().st_mtime_ns == first
    np.testing.assert_array_equal(np.load(redo.image), before)
    assert not list(tmp_path.rglob("*.tmp"))


def test_undecodable_samples_are_left_out_aligned(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "shards", 0) as writer:
        for i in range(3):
            buffer = io.BytesIO()
            Image.new("RGB", (40, 30), (80 * i, 20, 200)).save(buffer, format="JPEG")
            writer.add(key_for(0, i), buffer.getvalue(), f"image {i}", {"path": f"{i}.jpg"})
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="JPEG")
        truncated = buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]  # header fine, pixels cut off
        writer.add(key_for(0, 3), truncated, "broken", {"path": "broken.jpg"})
    tar = tmp_path / "shards" / "00000.tar"
    embed_shards([str(tar)], tmp_path / "emb", EmbedConfig("tiny-clip"))
    meta = pq.read_table(embedding_files(tmp_path / "emb", 0).metadata)
    assert meta["caption"].to_pylist() == ["image 0", "image 1", "image 2"]
    assert np.load(embedding_files(tmp_path / "emb", 0).image).shape[0] == 3
    assert meta["width"].to_pylist() == [40] * 3 and meta["height"].to_pylist() == [30] * 3


def test_model_from_a_run_directory(demo_data: Path, tmp_path: Path) -> None:
    from pretrain.config import load_config
    from pretrain.model import load_trained
    from pretrain.trainer import Trainer

    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=r", "train.steps=2", "checkpoint.every=2"])
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    url = demo_urls(demo_data, 1)
    assert (
        main(["embed", "--shards", url[0], "--model", str(cfg.run_dir), "--output", str(tmp_path / "e")]) == 0
    )
    trained, untrained = load_trained(cfg.run_dir).model, load_embedder("tiny-clip", None, "cpu").model
    changed = any(not torch.equal(a, b) for a, b in zip(trained.parameters(), untrained.parameters()))
    assert changed  # the run's weights were used, not a fresh init
    sample = next(iter_shard(url[0]))
    image = load_trained(cfg.run_dir).preprocess_val(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(trained.encode_image(image[None]), dim=-1)[0].numpy()
    np.testing.assert_allclose(np.load(embedding_files(tmp_path / "e", 0).image)[0], expected, atol=2e-3)


def test_cli_help_and_one_line_errors(demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["embed", "--help"]) == 0 and "--batch-size" in capsys.readouterr().out
    base = ["embed", "--shards", demo_urls(demo_data, 1)[0], "--output", str(tmp_path)]
    assert main([*base, "--model", "tiny-clip", "--batch-size", "0"]) == 2
    assert main([*base, "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert err.count("data-tools: error:") == 2 and "Traceback" not in err
