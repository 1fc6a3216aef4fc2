"""CLIP image and text embeddings of every sample, one output triple per input shard.

The output follows clip-retrieval's layout (embeddings.py), so its tools and ours (filter, semantic dedup,
stats) read it. The metadata parquet of shard ``i`` is written last, so a rerun skips complete shards.
The output may be an fsspec URL (``s3://bucket/emb``): each file is written locally, then uploaded whole,
metadata last; a local output gets temp names renamed into place.
Samples whose image or caption cannot be decoded are left out (all three files stay aligned) with a
warning. One process per GPU: on CUDA use one worker per node and split shards with rank/world.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from data_tools import models
from data_tools.embeddings import METADATA_SCHEMA, embedding_files, model_file
from data_tools.engine_ray import ActorSpec
from data_tools.runner import RunnerOptions, RunSummary, Task, run_tasks
from webshards import outputs
from webshards.layout import iter_shard
from webshards.lineage import write_lineage
from webshards.outputs import Location
from webshards.samples import BadSample
from webshards.spec import count_samples
from webshards.tasks import check_settings
from webshards.urls import open_url

log = logging.getLogger("data_tools")

_SIZE_FIELDS = ("width", "height", "original_width", "original_height")
DECODE_THREADS = 8  # on CUDA, JPEG decoding (which releases the GIL) would otherwise starve the GPU


@dataclass(frozen=True)
class EmbedConfig:
    """Which model embeds, and how."""

    model: str
    """An open_clip name, an export folder, a checkpoint folder or a run directory."""
    pretrained: str | None = None
    """open_clip pretrained tag (or weights file) when ``model`` is an open_clip name."""
    batch_size: int = 256
    """Samples per forward pass."""
    device: str = "cpu"
    """``cpu`` or ``cuda``; on CUDA the towers run under bf16 autocast, on CPU in fp32."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")


def embed_tasks(urls: list[str], output: Location, cfg: EmbedConfig, threads: int = 0) -> list[Task]:
    """One task per input shard, complete when its metadata parquet exists; ``threads`` > 0 caps torch's."""
    payload = (str(output), cfg, threads)
    return [
        Task(f"{i}:{url}", embedding_files(output, i).metadata, (url, i, *payload))
        for i, url in enumerate(urls)
    ]


def embed_shards(
    urls: list[str],
    output: Location,
    cfg: EmbedConfig,
    options: RunnerOptions | None = None,
    ray_cpus_per_actor: float = 1.0,
) -> RunSummary:
    """Embed every incomplete shard of ``urls`` into ``output`` (resumable, split across nodes).

    On Ray the shards stream to actors that each hold the model: one per GPU on CUDA, else one per
    ``ray_cpus_per_actor`` CPUs of the cluster (torch in each uses that many threads)."""
    if not urls:
        raise ValueError("no shards to embed")
    on_cuda = cfg.device.startswith("cuda")
    options = options or RunnerOptions()
    workers, local = options.workers, options.engine == "local"
    if on_cuda and workers > 1 and local:
        raise ValueError("embedding on cuda takes one worker per process (split nodes with rank/world)")
    models.check_model(cfg.model, cfg.pretrained)  # a bad model fails here, once, before any torch work
    if workers == 1 and local:  # (OpenMP state does not survive a fork; none on a Ray driver)
        load_embedder(cfg.model, cfg.pretrained, cfg.device)  # a bad weights file fails here, once
    for sub in ("img_emb", "text_emb", "metadata"):
        outputs.make_folder(outputs.join(output, sub))
    record_model(output, cfg)
    threads, actors = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0, None
    if not local:
        setup = partial(load_embedder, cfg.model, cfg.pretrained, cfg.device)
        actors = ActorSpec(setup, num_cpus=ray_cpus_per_actor, num_gpus=1.0 if on_cuda else 0.0)
        threads = max(1, int(ray_cpus_per_actor))
    tasks = embed_tasks(urls, output, cfg, threads)
    summary = run_tasks(tasks, embed_shard, options, desc="embed", actors=actors)
    record_lineage(urls, output, cfg, options, tasks)
    return summary


def record_lineage(urls: list[str], output: Location, cfg: EmbedConfig, options: RunnerOptions,
                   tasks: list[Task]) -> None:  # fmt: skip
    """Once every shard is embedded (whichever node sees that first): the folder's lineage, with the
    samples of the input shards and the rows embedded."""
    if not all(outputs.exists(task.output) for task in tasks):
        return
    embedded = sum(outputs.parquet_rows(task.output) for task in tasks)
    counts = {"samples_in": count_samples(urls), "samples_out": embedded}
    write_lineage(output, "embed", params=cfg, inputs={"shards": urls}, counts=counts, runner=options)


def record_model(output: Location, cfg: EmbedConfig) -> None:
    """Write which model embeds into ``output`` (``embed.json``), so later steps can embed other images
    with the same one (decontaminate); refuse a folder another model embedded into (their rows do not
    compare)."""
    model = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    settings = {"model": model, "pretrained": cfg.pretrained}
    if not check_settings(model_file(output), settings, "embeddings"):
        outputs.write_json(model_file(output), settings)


def embed_shard(task: Task) -> int:
    """The runner task: embed one shard, write both ``.npy`` files, then the metadata parquet last."""
    url, index, output, cfg, threads = task.payload
    if threads:
        torch.set_num_threads(threads)
    bundle = load_embedder(cfg.model, cfg.pretrained, cfg.device)
    images, texts, rows = [], [], []
    for batch in _batches(url, bundle, cfg.batch_size, cfg.device):
        image_emb, text_emb = encode_batch(bundle.model, batch["images"], batch["tokens"], cfg.device)
        images.append(image_emb)
        texts.append(text_emb)
        rows.extend(batch["rows"])
    image_all, text_all = _stack(images, bundle.model), _stack(texts, bundle.model)
    scores = (image_all * text_all).sum(axis=1)
    files = embedding_files(output, index)
    outputs.save_npy(files.image, image_all.astype(np.float16))
    outputs.save_npy(files.text, text_all.astype(np.float16))
    table = pa.Table.from_pylist(
        [{**r, "clip_score": float(s)} for r, s in zip(rows, scores)], METADATA_SCHEMA
    )
    with outputs.staged(files.metadata) as tmp:
        pq.write_table(table, tmp)
    return len(rows)


@lru_cache(maxsize=1)
def load_embedder(model: str, pretrained: str | None, device: str) -> Any:
    """The model bundle, loaded once per process (every task of a worker reuses it), in eval mode."""
    return models.load_model(model, pretrained, device)


@torch.no_grad()
def encode_batch(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised fp32 image and text embeddings; bf16 autocast on CUDA, plain fp32 on CPU."""
    on_cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    with autocast:
        image = model.encode_image(images.to(device, non_blocking=True))
        text = model.encode_text(tokens.to(device, non_blocking=True))
    # Normalise in fp32 so the stored fp16 rows have unit norm to fp16 precision.
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    return image.cpu().numpy(), text.cpu().numpy()


def _batches(url: str, bundle: Any, batch_size: int, device: str) -> Iterator[dict[str, Any]]:
    """Decoded, preprocessed batches of one shard (bad samples skipped); on CUDA, threads decode."""
    transform, normalize = models.split_transform(bundle.preprocess_val)
    decode = partial(_decode, transform=transform, size=models.image_size(bundle.model), url=url)
    threads = DECODE_THREADS if device.startswith("cuda") else 1
    with open_url(url) as stream, ThreadPoolExecutor(threads) as pool:
        samples = iter_shard(stream, decode=False)
        while raw := list(islice(samples, batch_size)):
            decoded = [d for d in pool.map(decode, raw) if d is not None]
            if decoded:
                batch = _collate(decoded, bundle.tokenizer)
                if normalize:
                    batch["images"] = normalize(batch["images"].to(device, non_blocking=True))
                yield batch


def _decode(sample: dict[str, Any], transform: Any, size: int, url: str) -> tuple | None:
    """(image tensor, caption, metadata row), or None with a warning for a sample that cannot be used."""
    try:
        image, caption = models.decode_cpu(sample, transform, size)
    except BadSample as error:
        log.warning("embed: skipping %s in %s: %s", sample.get("__key__"), url, error)
        return None
    return image, caption, _row(sample, caption)


def _row(sample: dict[str, Any], caption: str) -> dict[str, Any]:
    """The metadata row of a sample (clip_score is added once it is computed)."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    sizes = {name: meta.get(name) for name in _SIZE_FIELDS}
    return {"key": meta.get("key", sample["__key__"]), "uid": meta.get("uid"), "caption": caption, **sizes}


def _collate(batch: list[tuple[torch.Tensor, str, dict]], tokenizer: Any) -> dict[str, Any]:
    images, captions, rows = zip(*batch)
    return {"images": torch.stack(images), "tokens": tokenizer(list(captions)), "rows": list(rows)}


def _stack(parts: list[np.ndarray], model: torch.nn.Module) -> np.ndarray:
    """Concatenate batch outputs; an empty shard gives a (0, embed_dim) array."""
    if parts:
        return np.concatenate(parts)
    dim = int(getattr(model.visual, "output_dim", 0))
    return np.zeros((0, dim), dtype=np.float32)
