"""A procedural image-text data set for the demo: coloured shapes with varied captions.

32 classes (8 colours × 4 shapes) drawn with PIL on varied backgrounds, so a tiny CLIP learns
something measurable in minutes and zero-shot accuracy on the held-out eval split means something.
Each shard depends only on (seed, split, shard id): reruns give the same bytes, shards are written in
parallel (``webshards.tasks``), and complete shards are skipped (resumable). It lives in the bottom layer
so that ``make demo`` (pretrain) and ``data-tools demo-data`` both stand on it, not on each other.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from webshards import evalset
from webshards.atomic import write_json_atomic
from webshards.layout import (
    ShardWriter,
    is_complete,
    iter_shard,
    key_for,
    list_shards,
    make_uid,
    shard_name,
    stats_name,
    write_sizes,
)
from webshards.lineage import write_lineage
from webshards.tasks import RunSummary, Task, check_settings, in_pool, run_incomplete

# Saturated, far-apart colours so the colour word is unambiguous at 64 px.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 220, 35),
    "purple": (135, 45, 180),
    "orange": (250, 135, 25),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
CLASSNAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
# `--domain new`: colours and shapes the default set never shows, for continued-pretraining experiments
# (learn the new domain without forgetting the old one).
NEW_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (250, 120, 190),
    "cyan": (30, 210, 220),
    "brown": (130, 80, 30),
    "grey": (128, 128, 128),
}
NEW_SHAPES = ("pentagon", "hexagon", "diamond", "ring")


@dataclass(frozen=True)
class Domain:
    """The colours and shapes of a demo set; its classes are every colour x shape."""

    colours: dict[str, tuple[int, int, int]]
    shapes: tuple[str, ...]
    uid_prefix: str
    """Keeps uids of different domains apart (the default's is the original "demo")."""

    @property
    def classnames(self) -> list[str]:
        return [f"{colour} {shape}" for colour in self.colours for shape in self.shapes]


DOMAINS = {"default": Domain(COLOURS, SHAPES, "demo"), "new": Domain(NEW_COLOURS, NEW_SHAPES, "demo-new")}
"""`data-tools demo-data --domain`: the default 32 classes, or 16 new ones."""
TEMPLATES = (
    "a photo of a {c}.",
    "a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a drawing of a {c}.",
    "a small {c}.",
    "a large {c}.",
)
EVAL_SET_SHARDS = 4  # the classification set's tars: up to 4 ranks (x loader workers) share an eval
RETRIEVAL_IMAGES = 256  # images of the retrieval set (the first held-out ones), each with 3 captions
RETRIEVAL_SHARDS = 2
RETRIEVAL_DIR = "retrieval"
BACKGROUNDS = {"solid": "plain", "gradient": "gradient", "noise": "textured"}
SPLIT_STREAMS = {"train": 0, "eval": 1}  # eval draws from its own seed stream: held out
ADAPT_STREAM = 3  # the adaptation set's labelled training images (2 is the retrieval captions')
ADAPT_DIR = "adapt"
ADAPT_SHARD_SAMPLES = 1000
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down for anti-aliased edges
MIN_CONTRAST = 120.0  # least RGB distance between a background and the shape colour
GENERATOR_VERSION = 2  # bump when drawing changes, so stale folders are not mixed with new shards
SIZE_RANGE = (0.45, 0.85)  # shape extent as a fraction of the image side
# Shapes stand upright with a little jitter: a tiny ViT learns upright shapes in minutes on a CPU, while
# arbitrary rotations need far more steps than a demo has.
ROTATION_JITTER = math.radians(15)
UPRIGHT = {"square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2, "circle": 0.0,
           "pentagon": -math.pi / 2, "hexagon": 0.0, "diamond": 0.0, "ring": 0.0}  # fmt: skip
CORNERS = {"square": 4, "triangle": 3, "star": 10, "pentagon": 5, "hexagon": 6, "diamond": 4}
RING_HOLE = 0.55  # inner radius of a ring as a fraction of its outer radius


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: everything its content depends on."""

    folder: Path
    split: str
    shard_id: int
    start: int
    count: int
    image_size: int
    seed: int
    index_digits: int
    domain: str = "default"


def write_demo_data(
    output: Path,
    samples: int = 64000,
    eval_samples: int = 1600,
    image_size: int = 64,
    samples_per_shard: int = 4000,
    seed: int = 0,
    workers: int = 2,
    domain: str = "default",
    adapt_samples: int = 0,
) -> dict[str, Any]:
    """Write the demo set under ``output``: train/ and eval/ shards (img2dataset layout), the held-out images
    again as eval sets in clip_benchmark's layout (classification at ``output`` itself, retrieval in
    ``output/retrieval``), and demo.json (last).

    ``domain="new"`` draws the 16 classes of `NEW_COLOURS` x `NEW_SHAPES` instead of the default 32.
    ``adapt_samples`` > 0 also writes ``output/adapt``: a classification set with a labelled ``train`` split
    of that many new images (its own seed stream) and the held-out images as its ``test`` split, the input
    of ``pretrain adapt --train`` (docs/adaptation.md).
    Returns the demo.json content plus how many shards were written and skipped.
    """
    output = Path(output)
    settings = _validate(samples, eval_samples, image_size, samples_per_shard, seed, workers)
    if domain != "default":  # the default's demo.json stays as it always was
        settings["domain"] = domain
    if adapt_samples:
        settings["adapt_samples"] = adapt_samples
    check_settings(output / "demo.json", settings, "demo data")  # refuse to mix shards of other settings
    output.mkdir(parents=True, exist_ok=True)
    tasks = _plan(output, settings)
    summary = _run(tasks, workers)
    for split in {task.split for task in tasks}:
        write_sizes(output / split)
    eval_sets = write_eval_sets(output, settings["seed"], domain) if settings["eval_samples"] else {}
    if adapt_samples and settings["eval_samples"]:
        eval_sets["adapt"] = write_adapt_set(output, settings["seed"], domain, adapt_samples, image_size)
    info = {
        **settings,
        "classes": len(DOMAINS[domain].classnames),
        **_shard_specs(tasks),
        "eval_sets": eval_sets,
    }
    write_json_atomic(output / "demo.json", info)  # last: demo.json appears only when all is written
    counts = {"samples_out": settings["samples"], "eval_samples": settings["eval_samples"]}
    for folder in (output / split for split in SPLIT_STREAMS if (output / split).is_dir()):
        write_lineage(folder, "demo-data", params=settings, counts=counts)
    return {**info, "shards_written": len(summary.done), "shards_skipped": len(summary.skipped)}


def _validate(
    samples: int, eval_samples: int, image_size: int, samples_per_shard: int, seed: int, workers: int
) -> dict[str, int]:
    """The settings that determine the data, after checking each one."""
    minimums = {"samples": 1, "eval_samples": 0, "image_size": 16, "samples_per_shard": 1, "workers": 1}
    values = dict(samples=samples, eval_samples=eval_samples, image_size=image_size)
    values.update(samples_per_shard=samples_per_shard, workers=workers)
    for name, minimum in minimums.items():
        if values[name] < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {values[name]}")
    del values["workers"]  # how many processes write the data does not change it
    return {**values, "seed": seed, "generator": GENERATOR_VERSION}


def _plan(output: Path, settings: dict[str, int]) -> list[ShardTask]:
    """The shards of both splits, largest work first."""
    per_shard = settings["samples_per_shard"]
    index_digits = max(4, len(str(per_shard - 1)))
    tasks = []
    for split, total in (("train", settings["samples"]), ("eval", settings["eval_samples"])):
        for shard_id, start in enumerate(range(0, total, per_shard)):
            count = min(per_shard, total - start)
            args = (split, shard_id, start, count, settings["image_size"], settings["seed"], index_digits)
            tasks.append(ShardTask(output / split, *args, settings.get("domain", "default")))
    return tasks


def _is_done(task: ShardTask) -> bool:
    """A shard is skipped when it is complete and holds the expected number of samples."""
    if not is_complete(task.folder, task.shard_id):
        return False
    stats = json.loads(_stats_file(task).read_text())
    return stats.get("count") == task.count


def _stats_file(task: ShardTask) -> Path:
    return task.folder / stats_name(shard_name(task.shard_id))


def _run(tasks: list[ShardTask], workers: int) -> RunSummary:
    """Write the shards in a local process pool, all of them on this node (the demo set is small: no rank
    split); a failed shard stops the demo."""
    for task in tasks:
        if not _is_done(task):  # a complete shard of another size is rewritten: unmark it
            _stats_file(task).unlink(missing_ok=True)
    jobs = [Task(f"{task.split}/{shard_name(task.shard_id)}", _stats_file(task), task) for task in tasks]
    summary = run_incomplete(jobs, _write_job, in_pool(workers), desc="demo-data", unit="img")
    if summary.failed:
        name, reason = summary.failed[0]
        raise RuntimeError(f"demo shard {name} failed: {reason}")
    return summary


def _write_job(job: Task) -> int:
    return write_shard(job.payload)


def write_shard(task: ShardTask) -> int:
    """Write one shard; classes go round robin over global indices, shuffled inside the shard."""
    domain = DOMAINS[task.domain]
    rng = np.random.default_rng([task.seed, SPLIT_STREAMS[task.split], task.shard_id])
    labels = (task.start + np.arange(task.count)) % len(domain.classnames)
    rng.shuffle(labels)
    with ShardWriter(task.folder, task.shard_id) as writer:
        for index, label in enumerate(labels.tolist()):
            key = key_for(task.shard_id, index, task.index_digits)
            image_bytes, caption, meta = render_sample(rng, label, task.image_size, domain)
            meta["path"] = f"{domain.uid_prefix}/{task.split}/{key}"
            meta["uid"] = make_uid(domain.uid_prefix, str(task.seed), task.split, key)
            extras = {"cls": str(label)} if task.split == "eval" else None
            writer.add(key, image_bytes, caption, meta, extras=extras)
    return task.count


def render_sample(
    rng: np.random.Generator, label: int, image_size: int, domain: Domain = DOMAINS["default"]
) -> tuple[bytes, str, dict]:
    """Draw one sample of class ``label`` of ``domain``: JPEG bytes, a caption, and its json metadata."""
    colour, shape = domain.classnames[label].split(" ")
    fill = domain.colours[colour]
    background_kind = str(rng.choice(list(BACKGROUNDS)))
    background = _background(rng, background_kind, fill, image_size)
    fraction = float(rng.uniform(*SIZE_RANGE))
    mask = _shape_mask(rng, shape, fraction, image_size)
    image = Image.composite(Image.new("RGB", background.size, fill), background, mask)
    if rng.random() < 0.5:
        image = _add_noise(rng, image, sigma=float(rng.uniform(1.0, 4.0)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    caption = _caption(rng, colour, shape, fraction, BACKGROUNDS[background_kind])
    meta = {"label": label, "classname": domain.classnames[label], "background": background_kind}
    return buffer.getvalue(), caption, meta


def _background_colour(rng: np.random.Generator, avoid: tuple[int, int, int]) -> np.ndarray:
    """A muted random colour far enough from the shape colour that the shape stays visible."""
    for _ in range(32):
        grey = rng.uniform(60, 200)
        colour = 0.5 * rng.uniform(0, 255, size=3) + 0.5 * grey
        if np.linalg.norm(colour - np.asarray(avoid)) >= MIN_CONTRAST:
            return colour
    return np.full(3, 255.0 - np.mean(avoid))  # fallback: the opposite grey always contrasts


def _background(rng: np.random.Generator, kind: str, avoid: tuple[int, int, int], size: int) -> Image.Image:
    """A solid, two-colour gradient, or noise-textured background."""
    first = _background_colour(rng, avoid)
    if kind == "solid":
        return Image.new("RGB", (size, size), tuple(int(c) for c in first))
    pixels = np.broadcast_to(first, (size, size, 3)).astype(np.float32)
    if kind == "gradient":
        second = _background_colour(rng, avoid)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
        pixels = first * (1 - t[..., None]) + second * t[..., None]
    elif kind == "noise":
        pixels = pixels + 14.0 * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _shape_mask(rng: np.random.Generator, shape: str, fraction: float, size: int) -> Image.Image:
    """An anti-aliased mask of the shape: its extent is ``fraction`` of the image side."""
    canvas = size * SUPERSAMPLE
    radius = fraction * canvas / 2
    cx, cy = rng.uniform(radius, canvas - radius, size=2)
    rotation = UPRIGHT[shape] + rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        if shape == "ring":
            hole = RING_HOLE * radius
            draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, rotation), fill=255)
    return mask.reduce(SUPERSAMPLE)


def _polygon(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of a rotated square, triangle or five-pointed star inside a circle of ``radius``."""
    corners = CORNERS[shape]
    points = []
    for i in range(corners):
        r = radius * (0.45 if shape == "star" and i % 2 else 1.0)
        angle = rotation + 2 * math.pi * i / corners
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _add_noise(rng: np.random.Generator, image: Image.Image, sigma: float) -> Image.Image:
    """Light Gaussian pixel noise, like sensor noise on a photo."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels += sigma * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _caption(rng: np.random.Generator, colour: str, shape: str, fraction: float, background: str) -> str:
    """A caption that always names colour and shape, in one of several phrasings."""
    size = "small" if fraction < 0.58 else "large" if fraction > 0.72 else "medium-sized"
    captions = _phrasings(colour, shape, size, background)
    return captions[int(rng.integers(len(captions)))]


def _phrasings(colour: str, shape: str, size: str | None, background: str) -> tuple[str, ...]:
    """Every phrasing of a caption, in a fixed order (the training captions index it); without a `size`,
    those that name it are left out."""
    article = "an" if colour[0] in "aeiou" else "a"
    name = f"{colour} {shape}"
    captions = (
        f"a photo of {article} {name}",
        f"{article} {name} on a {background} background",
        f"a {size} {name}",
        name,
        f"a picture of {article} {name}",
        f"{article} {name}",
        f"a {shape} coloured {colour}",
        f"a {size} {name} on a {background} background",
        f"the {shape} is {colour}",
        f"a drawing of {article} {name}",
    )
    return captions if size else tuple(c for i, c in enumerate(captions) if i not in (2, 7))


def write_eval_sets(output: Path, seed: int, domain: str = "default") -> dict[str, str]:
    """The held-out images as eval sets in clip_benchmark's layout: classification (class index per image,
    same images and prompts as always) at ``output``, retrieval (3 captions per image) in ``retrieval/``.
    Returns their roots relative to ``output``. Skipped when written before (settings are checked)."""
    sets = {"zeroshot": ".", "demo-retrieval": RETRIEVAL_DIR}
    if evalset.is_finished(output) and evalset.is_finished(output / RETRIEVAL_DIR):
        return sets
    samples = [s for shard in list_shards(output / "eval") for s in iter_shard(shard, decode=False)]
    classification = [
        (evalset.sample_key(j), {"jpg": s["jpg"], "cls": s["cls"]}) for j, s in enumerate(samples)
    ]
    _write_split(output, classification, EVAL_SET_SHARDS)
    evalset.write_metadata(output, evalset.CLASSIFICATION, DOMAINS[domain].classnames, list(TEMPLATES))
    evalset.finish(output, EVAL_SET_SHARDS)
    retrieval = [
        (evalset.sample_key(j), {"jpg": s["jpg"], "txt": _retrieval_captions(seed, j, s, domain)})
        for j, s in enumerate(samples[:RETRIEVAL_IMAGES])
    ]
    _write_split(output / RETRIEVAL_DIR, retrieval, RETRIEVAL_SHARDS)
    evalset.write_metadata(output / RETRIEVAL_DIR, evalset.RETRIEVAL)
    evalset.finish(output / RETRIEVAL_DIR, RETRIEVAL_SHARDS)
    return sets


def write_adapt_set(output: Path, seed: int, domain: str, samples: int, image_size: int) -> str:
    """``output/adapt``: clip_benchmark's layout with a ``train`` split (`samples` new labelled images, classes
    round robin, shuffled) and the held-out classification images as ``test``. Returns its root relative to
    ``output``; skipped when written before (settings are checked)."""
    root = output / ADAPT_DIR
    if evalset.is_finished(root, "train") and evalset.is_finished(root):
        return ADAPT_DIR
    names = DOMAINS[domain].classnames
    rng = np.random.default_rng([seed, ADAPT_STREAM])
    labels = np.arange(samples) % len(names)
    rng.shuffle(labels)
    train = []
    for j, label in enumerate(labels.tolist()):
        image, _, _ = render_sample(rng, label, image_size, DOMAINS[domain])
        train.append((evalset.sample_key(j), {"jpg": image, "cls": str(label).encode()}))
    test = [s for shard in evalset.shard_urls(str(output)) for s in iter_shard(shard, decode=False)]
    test = [(s["__key__"], {"jpg": s["jpg"], "cls": s["cls"]}) for s in test]
    _write_split(root, train, -(-samples // ADAPT_SHARD_SAMPLES), "train")
    _write_split(root, test, EVAL_SET_SHARDS)
    evalset.write_metadata(root, evalset.CLASSIFICATION, names, list(TEMPLATES))
    evalset.finish(root, -(-samples // ADAPT_SHARD_SAMPLES), "train")
    evalset.finish(root, EVAL_SET_SHARDS)
    return ADAPT_DIR


def _write_split(root: Path, samples: list, shards: int, split: str = evalset.SPLIT) -> None:
    """`samples` in `shards` tars of (nearly) equal size, in order."""
    bounds = np.linspace(0, len(samples), shards + 1).astype(int)
    for i in range(shards):
        evalset.write_shard(root / split / f"{i}.tar", samples[bounds[i] : bounds[i + 1]])


def _retrieval_captions(seed: int, index: int, sample: dict, domain: str = "default") -> bytes:
    """3 different phrasings for a held-out image (one per line), drawn from its own seed stream."""
    meta = json.loads(sample["json"])
    colour, shape = DOMAINS[domain].classnames[meta["label"]].split(" ")
    phrasings = _phrasings(colour, shape, None, BACKGROUNDS[meta["background"]])
    rng = np.random.default_rng([seed, 2, index])
    return "\n".join(phrasings[i] for i in rng.choice(len(phrasings), 3, replace=False)).encode()


def _shard_specs(tasks: list[ShardTask]) -> dict[str, Any]:
    """Shard counts and brace-expanded shard specs (relative to the output folder) per split."""
    specs: dict[str, Any] = {}
    for split in SPLIT_STREAMS:
        count = sum(task.split == split for task in tasks)
        specs[f"{split}_shards"] = count
        specs[split] = f"{split}/{{00000..{count - 1:05d}}}.tar" if count else None
    return specs
