"""data-tools embed: the clip-retrieval layout, dtypes, normalisation, alignment, resume, model sources."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from helpers import ROOT, TINY
from PIL import Image
from safetensors.torch import load_model, save_model

from data_tools.cli import main
from data_tools.embed import EmbedConfig, embed_shards
from data_tools.embeddings import embedding_files, metadata_files
from webshards.layout import ShardWriter, iter_shard, key_for


def demo_urls(demo_data: Path, count: int = 2) -> list[str]:
    return [str(demo_data / "train" / f"{i:05d}.tar") for i in range(count)]


def reference_tiny_clip() -> tuple[torch.nn.Module, object, object]:
    """A tiny-clip (random weights) with its eval transform and tokenizer, built by open_clip alone."""
    open_clip.add_model_config(ROOT / "configs" / "models")
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip")
    return model.eval(), preprocess, open_clip.get_tokenizer("tiny-clip")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    """An export folder (open_clip's local-dir layout) written here with safetensors, and the open_clip
    model it was written from: the embeddings of `data-tools embed --model FOLDER` must be that model's."""
    torch.manual_seed(1)
    model, preprocess, tokenizer = reference_tiny_clip()
    folder = tmp_path_factory.mktemp("export")
    model_cfg = json.loads((ROOT / "configs/models/tiny-clip.json").read_text())
    preprocess_cfg = {
        "size": 64,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_model(model, str(folder / "open_clip_model.safetensors"))
    return folder, (model, preprocess, tokenizer)


@pytest.fixture(scope="module")
def embedded(demo_data: Path, reference: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embeddings")
    summary = embed_shards(demo_urls(demo_data), out, EmbedConfig(str(reference[0]), batch_size=50))
    assert summary.ok() and summary.samples == 256
    return out


def tar_samples(url: str) -> list[tuple[str, Image.Image, str]]:
    """(key, image, caption) of every sample of a shard in order, read with tarfile and PIL only."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(url) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [
        (k, Image.open(io.BytesIO(m["jpg"])).convert("RGB"), m["txt"].decode()) for k, m in members.items()
    ]


@torch.no_grad()
def reference_embeddings(bundle: tuple, url: str) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings of a shard, computed with open_clip outside our code."""
    model, preprocess, tokenizer = bundle
    samples = tar_samples(url)
    images = torch.stack([preprocess(image) for _, image, _ in samples])
    image = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    text = torch.nn.functional.normalize(model.encode_text(tokenizer([c for _, _, c in samples])), dim=-1)
    return image.numpy(), text.numpy()


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


def test_embeddings_match_a_fresh_open_clip_model(embedded: Path, demo_data: Path, reference: tuple) -> None:
    for i, url in enumerate(demo_urls(demo_data)):
        expected_image, expected_text = reference_embeddings(reference[1], url)
        files = embedding_files(embedded, i)
        np.testing.assert_allclose(np.load(files.image), expected_image, atol=2e-3)
        np.testing.assert_allclose(np.load(files.text), expected_text, atol=2e-3)
        keys = [k for k, _, _ in tar_samples(url)]
        assert pq.read_table(files.metadata)["key"].to_pylist() == keys


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
    from pretrain.training.trainer import Trainer

    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=r", "train.steps=2", "checkpoint.every=2"])
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    url = demo_urls(demo_data, 1)
    assert (
        main(["embed", "--shards", url[0], "--model", str(cfg.run_dir), "--output", str(tmp_path / "e")]) == 0
    )
    # The reference: a fresh open_clip tiny-clip given the checkpoint's weights file by safetensors itself.
    model, preprocess, tokenizer = reference_tiny_clip()
    load_model(model, str(cfg.run_dir / "checkpoints" / "step_00000002" / "model.safetensors"))
    expected_image, expected_text = reference_embeddings((model, preprocess, tokenizer), url[0])
    np.testing.assert_allclose(np.load(embedding_files(tmp_path / "e", 0).image), expected_image, atol=2e-3)
    np.testing.assert_allclose(np.load(embedding_files(tmp_path / "e", 0).text), expected_text, atol=2e-3)


def test_cli_help_and_one_line_errors(demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["embed", "--help"]) == 0 and "--batch-size" in capsys.readouterr().out
    base = ["embed", "--shards", demo_urls(demo_data, 1)[0], "--output", str(tmp_path)]
    assert main([*base, "--model", "tiny-clip", "--batch-size", "0"]) == 2
    assert main([*base, "--model", "no-such-model"]) == 2
    assert main([*base, "--model", "runs/nope"]) == 2  # a missing path, not an unknown model name
    err = capsys.readouterr().err
    assert err.count("data-tools: error:") == 3 and "Traceback" not in err
    assert "--model runs/nope: no such checkpoint, run directory or export folder" in err


def test_a_model_without_weights_is_said_loudly(caplog: pytest.LogCaptureFixture) -> None:
    """An open_clip name without --pretrained embeds with random weights: a warning says so."""
    from data_tools.models import check_model

    with caplog.at_level("WARNING", logger="data_tools"):
        check_model("tiny-clip", None)
    assert "--model tiny-clip has no weights" in caplog.text and "random weights" in caplog.text
