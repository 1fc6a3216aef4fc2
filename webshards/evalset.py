"""Eval sets in clip_benchmark's webdataset layout: the one place that knows it (``pretrain`` reads, and
``data_tools`` writes, through it). The layout LAION and DataComp share for their benchmarks::

    ROOT/classnames.txt                          one class name per line (classification)
    ROOT/zeroshot_classification_templates.txt   one prompt per line, ``{c}`` marks the class name
    ROOT/dataset_type.txt                        ``retrieval`` for retrieval sets (absent: classification)
    ROOT/test/nshards.txt                        N
    ROOT/test/{0..N-1}.tar                       KEY.webp|png|jpg|jpeg + KEY.cls (class index) or
                                                 KEY.txt (captions, one per line)

ROOT may be a local folder or any URL the shard layer opens (``s3://``, ``http(s)://``). A writer puts each
tar in place by renaming a temp file and writes ``nshards.txt`` last, so a set with ``nshards.txt`` is
complete.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from webshards.atomic import atomic_path, write_atomic
from webshards.urls import local_path, open_url

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
SPLIT = "test"
CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
TASKS = (CLASSIFICATION, RETRIEVAL)


@dataclass(frozen=True)
class EvalSet:
    """What an eval set's ROOT holds: its task kind, class names and prompts (classification) and shards."""

    root: str
    task: str
    shards: tuple[str, ...]
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        """The shards as one brace-expanded spec, ``ROOT/test/{0..N-1}.tar`` (clip_benchmark's pattern)."""
        folder = posixpath.dirname(self.shards[0])
        return f"{folder}/{{0..{len(self.shards) - 1}}}.tar"


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local folder or a URL."""
    return posixpath.join(root.rstrip("/"), *parts) if local_path(root) is None else str(Path(root, *parts))


def read_text(url: str) -> str | None:
    """The UTF-8 text of a file of the set, or None when it does not exist."""
    path = local_path(url)
    if path is not None:
        return Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
    try:
        with open_url(url, retries=1) as f:
            return f.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None


def _lines(url: str) -> tuple[str, ...]:
    text = read_text(url)
    if text is None:
        raise FileNotFoundError(f"eval set file not found: {url}")
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise ValueError(f"eval set file is empty: {url}")
    return lines


def task_of(root: str) -> str:
    """The task kind of ROOT from ``dataset_type.txt`` (absent: classification)."""
    kind = (read_text(join(root, DATASET_TYPE_FILE)) or "").strip()
    if kind in ("", "classification", CLASSIFICATION):
        return CLASSIFICATION
    if kind in ("retrieval", RETRIEVAL):
        return RETRIEVAL
    raise ValueError(
        f"{join(root, DATASET_TYPE_FILE)}: unknown dataset type {kind!r} (classification or retrieval)"
    )


def shard_urls(root: str, split: str = SPLIT) -> tuple[str, ...]:
    """``ROOT/split/{0..N-1}.tar`` with N from ``nshards.txt`` (clip_benchmark's pattern)."""
    where = join(root, split, NSHARDS_FILE)
    text = read_text(where)
    if text is None:
        raise FileNotFoundError(f"not an eval set (clip_benchmark layout): {where} not found")
    try:
        count = int(text.strip())
    except ValueError:
        raise ValueError(f"{where}: expected a number of shards, got {text.strip()[:40]!r}") from None
    if count < 1:
        raise ValueError(f"{where}: the set has {count} shards")
    return tuple(join(root, split, f"{i}.tar") for i in range(count))


def read_eval_set(root: str | Path, task: str | None = None, split: str = SPLIT) -> EvalSet:
    """Describe the eval set at ROOT; `task` (when given) overrides ``dataset_type.txt``."""
    root = str(root)
    if task is not None and task not in TASKS:
        raise ValueError(f"eval task must be one of {TASKS}, got {task!r}")
    kind = task or task_of(root)
    shards = shard_urls(root, split)
    if kind == RETRIEVAL:
        return EvalSet(root, kind, shards)
    classnames = _lines(join(root, CLASSNAMES_FILE))
    templates = _lines(join(root, TEMPLATES_FILE))
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"{join(root, TEMPLATES_FILE)}: template {bad[0]!r} has no {{c}} for the class name")
    return EvalSet(root, kind, shards, classnames, templates)


def fill_template(template: str, classname: str) -> str:
    """A prompt for a class: clip_benchmark's ``template.format(c=classname)``."""
    return template.format(c=classname)


# ---- writing --------------------------------------------------------------------------------------------
def sample_key(index: int) -> str:
    """The key of the `index`-th sample of a set (``s0000042``), unique over all shards."""
    return f"s{index:07d}"


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write one tar of ``(key, {ext: bytes})`` samples atomically; returns how many it holds."""
    count = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def write_metadata(root: Path, task: str, classnames: list[str] = (), templates: list[str] = ()) -> None:
    """The set's text files but ``nshards.txt``: class names and prompts, or the retrieval marker."""
    if task == RETRIEVAL:
        write_atomic(root / DATASET_TYPE_FILE, b"retrieval\n")
        return
    write_atomic(root / CLASSNAMES_FILE, ("\n".join(classnames) + "\n").encode("utf-8"))
    write_atomic(root / TEMPLATES_FILE, ("\n".join(templates) + "\n").encode("utf-8"))


def finish(root: Path, count: int, split: str = SPLIT) -> None:
    """Mark the set complete: ``nshards.txt``, written last."""
    write_atomic(root / split / NSHARDS_FILE, f"{count}\n".encode())


def is_finished(root: Path, split: str = SPLIT) -> bool:
    return (root / split / NSHARDS_FILE).is_file()
