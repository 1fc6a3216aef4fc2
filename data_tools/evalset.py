"""``data-tools eval-set``: an eval set in clip_benchmark's webdataset layout (``webshards.evalset``) from
an ImageFolder tree (classification) or a table of image paths and captions (retrieval).

- ImageFolder: one sub-folder per class, classes in sorted order (torchvision's ImageFolder indices). A tree
  of the 1000 ImageNet WordNet ids (``n01440764`` …) gets open_clip's ImageNet class names and the OpenAI
  prompts; other trees use the folder names and ``a photo of a {c}.``.
- Table (CSV/TSV/JSONL/parquet, columns as ``data-tools build`` detects them): one row per (image, caption);
  rows of the same image are one sample with several captions, and a caption cell may hold several lines.

Images keep their bytes when they are JPEG, PNG or WebP (others are re-encoded as PNG). Shards are tasks
of the one runner: each tar appears under its final name only when complete, so a rerun skips them, and
``nshards.txt`` is written last.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from data_tools.inputs import IMAGE_EXTENSIONS, iter_rows, resolve_input
from data_tools.runner import RunnerOptions, RunSummary, Task, run_tasks
from webshards import evalset as layout
from webshards.atomic import write_json_atomic
from webshards.lineage import write_lineage
from webshards.tasks import check_settings

KEPT_FORMATS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
WORDNET_ID = re.compile(r"^n\d{8}$")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
SETTINGS_FILE = ".eval-set.json"


@dataclass(frozen=True)
class Item:
    """One sample to write: its image file and its target (`cls` index or `txt` caption lines)."""

    image: str
    target: str


@dataclass(frozen=True)
class ShardJob:
    path: Path
    start: int
    items: tuple[Item, ...]
    target_ext: str


def imagenet_metadata(classes: list[str]) -> tuple[list[str], list[str]] | None:
    """open_clip's ImageNet class names and OpenAI prompts when `classes` are the 1000 WordNet ids."""
    if len(classes) != 1000 or not all(WORDNET_ID.match(c) for c in classes):
        return None
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return list(IMAGENET_CLASSNAMES), [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]


def folder_items(folder: Path) -> tuple[list[Item], list[str], list[str]]:
    """The images of an ImageFolder tree with class indices; class names and prompts."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder}: no class sub-folders (an ImageFolder tree has one per class)")
    items = [
        Item(str(path), str(index))
        for index, name in enumerate(classes)
        for path in sorted((folder / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")
    ]
    if not items:
        raise ValueError(f"{folder}: no images in its {len(classes)} class folders")
    names, templates = imagenet_metadata(classes) or (classes, list(DEFAULT_TEMPLATES))
    return items, names, templates


def table_items(table: Path) -> list[Item]:
    """Samples of a caption table: rows of one image merged, caption lines kept in row order."""
    spec = resolve_input(table)
    captions: dict[str, list[str]] = {}
    for number, row in enumerate(iter_rows(spec), 2):
        if row.kind == "url" or not row.source:
            raise ValueError(f"{table.name} row {number}: need a local image path, got {row.source!r}")
        path = Path(row.source) if Path(row.source).is_absolute() else spec.base / row.source
        lines = [line.strip() for line in row.caption.splitlines() if line.strip()]
        captions.setdefault(str(path), []).extend(lines)
    missing = [p for p in captions if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{table.name}: image not found: {missing[0]} ({len(missing)} missing)")
    empty = [p for p, lines in captions.items() if not lines]
    if empty:
        raise ValueError(f"{table.name}: image {empty[0]} has no caption")
    return [Item(path, "\n".join(lines)) for path, lines in captions.items()]


def image_member(path: str) -> tuple[str, bytes]:
    """(extension, bytes) of an image file: the file as it is when clip_benchmark's readers take its format."""
    suffix = Path(path).suffix.lower()
    data = Path(path).read_bytes()
    if suffix in KEPT_FORMATS:
        return KEPT_FORMATS[suffix], data
    try:
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return "png", out.getvalue()


def _write_job(task: Task) -> int:
    job: ShardJob = task.payload

    def samples():
        for offset, item in enumerate(job.items):
            ext, data = image_member(item.image)
            yield layout.sample_key(job.start + offset), {ext: data, job.target_ext: item.target.encode()}

    return layout.write_shard(job.path, samples())


def build_eval_set(
    input_path: Path, output: Path, task: str | None = None, samples_per_shard: int = 5000, workers: int = 1
) -> RunSummary:
    """Write the eval set; returns the runner's summary (``nshards.txt`` only when every shard is there)."""
    input_path, output = Path(input_path), Path(output)
    task = task or ("classification" if input_path.is_dir() else "retrieval")
    if task == "classification":
        if not input_path.is_dir():
            raise ValueError(f"--task classification needs an ImageFolder tree, got {input_path}")
        items, classnames, templates = folder_items(input_path)
    else:
        if input_path.is_dir():
            raise ValueError(
                f"--task retrieval needs a CSV/parquet table of image paths and captions, got {input_path}"
            )
        items, classnames, templates = table_items(input_path), [], []
    kind = layout.CLASSIFICATION if task == "classification" else layout.RETRIEVAL
    settings = {"input": str(input_path.resolve()), "task": kind, "samples": len(items),
                "samples_per_shard": samples_per_shard}  # fmt: skip
    check_settings(output / SETTINGS_FILE, settings, "an eval set")
    (output / layout.SPLIT).mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / SETTINGS_FILE, settings)
    jobs = _plan(output, items, samples_per_shard, "cls" if kind == layout.CLASSIFICATION else "txt")
    one_node = RunnerOptions(workers, rank=0, world=1)
    summary = run_tasks(jobs, _write_job, one_node, desc="eval-set", unit="img")
    if summary.ok():
        layout.write_metadata(output, kind, classnames, templates)
        layout.finish(output, len(jobs))
        counts = {"samples_out": len(items), "classes": len(classnames) or None, "shards_out": len(jobs)}
        write_lineage(output, "eval-set", params=settings, inputs={"input": input_path}, counts=counts)
    return summary


def _plan(output: Path, items: list[Item], per_shard: int, target_ext: str) -> list[Task]:
    tasks = []
    for shard, start in enumerate(range(0, len(items), per_shard)):
        path = output / layout.SPLIT / f"{shard}.tar"
        job = ShardJob(path, start, tuple(items[start : start + per_shard]), target_ext)
        tasks.append(Task(f"{shard}.tar", path, job))
    return tasks


def describe(output: Path) -> str:
    """One line about a finished set, e.g. ``out: zeroshot_retrieval, 2 shards, 5 images``."""
    settings = json.loads((Path(output) / SETTINGS_FILE).read_text())
    nshards = (Path(output) / layout.SPLIT / layout.NSHARDS_FILE).read_text().strip()
    return f"eval set in {output}: {settings['task']}, {nshards} shards, {settings['samples']} images"
