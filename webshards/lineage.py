"""Lineage: one chained record of how a data set was made, written next to each stage's output.

A folder output gets ``DIR/lineage.json``, a file output (a keep list ``STEM.parquet``) ``STEM_lineage.json``
beside it. The file holds::

    {"format": 1,
     "stage": {"id", "name", "command", "tool", "started", "ended", "run", "params",
               "inputs": [{"role", "kind", "location", "fingerprint", "method", ..., "parents": [ID]}],
               "outputs": [...], "counts": {...}, "parents": [ID, ...]},
     "ancestors": {ID: stage, ...}}

Parents are found, not passed: the lineage file of each input folder (a shard spec's folders, an embeddings
folder, an eval set) or beside each input file (``STEM_lineage.json``, else its folder's ``lineage.json``).
Every earlier stage is stored once in ``ancestors``, keyed by its id, and referred to by id, so a chain that
reaches a stage twice (filter and dedup both from one embed) stays small. An id is a digest of the stage's
name, parameters and the fingerprints of its inputs and outputs: rerunning a stage on the same data (a
resume) gives the same id, never a second entry.

The file is written after the stage's own outputs and is no completion marker: readers that trust markers
keep trusting the stage's own.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any

from webshards import outputs as store
from webshards.args import invocation
from webshards.fingerprints import describe, is_folder
from webshards.outputs import Location
from webshards.urls import redact_url

log = logging.getLogger("webshards")

FORMAT = 1
FOLDER_FILE = "lineage.json"
FILE_SUFFIX = "_lineage.json"
PACKAGE = "clip-pretrain"


def write_lineage(
    output: Location,
    stage: str,
    *,
    params: Any = None,
    inputs: dict[str, Any] | None = None,
    counts: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    runner: Any = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Write the lineage of ``output`` (a folder: ``DIR/lineage.json``; a file: ``STEM_lineage.json`` beside
    it) once the stage's own outputs are written, on the one process that wrote them; returns the document.

    - ``stage``: the stage's name (``build``, ``embed``, ``filter``, ``dedup``, ``reshard``, ...).
    - ``params``: its config (a dataclass or a dict), recorded as a dict.
    - ``inputs``: role -> what was read: a shard spec, a folder, a file, or a list (for the role ``shards``
      one input of shard URLs, else one input per item, e.g. several keep lists); each is fingerprinted
      and its lineage, if any, chained as a parent.
    - ``counts``: the stage's numbers, e.g. ``{"samples_in": 512, "samples_out": 307, "removed": {...}}``;
      ``samples_in``/``samples_out`` are what the model card's summary shows.
    - ``outputs``: role -> what was written (default ``{"output": output}``), fingerprinted alike.
    - ``runner``: the job's ``RunnerOptions`` (its engine, workers and ranks are recorded).
    - ``started``: epoch seconds; default: when the command began (``webshards.args.invocation``).
    """
    ancestors: dict[str, dict[str, Any]] = {}
    record = {
        "name": stage,
        "command": _command(),
        "tool": tool_version(),
        "started": _iso(started if started is not None else _command_start()),
        "ended": _iso(time.time()),
        "run": _run_info(runner),
        "params": jsonable(params) if params is not None else {},
        "inputs": [describe_input(role, value, ancestors) for role, value in _each(inputs or {})],
        "outputs": [describe(role, value)[0] for role, value in _each(outputs or {"output": output})],
        "counts": jsonable(counts or {}),
    }
    record["parents"] = list(dict.fromkeys(p for item in record["inputs"] for p in item.get("parents", [])))
    record = {"id": stage_id(record), **record}
    doc = {"format": FORMAT, "stage": record, "ancestors": ancestors}
    store.write_json(lineage_file(output), doc)
    return doc


def lineage_file(output: Location) -> Location:
    """Where the lineage of ``output`` lives: ``DIR/lineage.json`` for a folder, ``STEM_lineage.json`` beside
    a file (what is not a folder and whose name has a suffix, such as ``keep.parquet``)."""
    output = store.resolve(output)
    is_file = not is_folder(output) and bool(Path(store.name(output)).suffix)
    return store.beside(output, FILE_SUFFIX) if is_file else store.join(output, FOLDER_FILE)


def read_lineage(location: Location) -> dict[str, Any] | None:
    """A lineage document, or None when the file is absent; one that cannot be read (not JSON, another
    format) is logged as a warning naming it and left out: lineage never stops a stage."""
    try:
        if not store.exists(location):
            return None
        doc = json.loads(store.read_bytes(location))
    except (OSError, ValueError) as error:
        log.warning("lineage %s left out: %s", redact_url(str(location)), error)
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "id" not in doc.get("stage", {}):
        log.warning("lineage %s left out: not lineage format %d", redact_url(str(location)), FORMAT)
        return None
    return doc


def parent_lineage(kind: str, places: list[str]) -> list[dict[str, Any]]:
    """The lineage documents of an input's parents: each folder's ``lineage.json``; for a file the one beside
    it (``STEM_lineage.json``), else its folder's."""
    docs = []
    for place in places:
        if kind == "file":
            candidates = [store.beside(place, FILE_SUFFIX), store.with_name(place, FOLDER_FILE)]
        else:
            candidates = [store.join(place, FOLDER_FILE)]
        found = next((doc for doc in map(read_lineage, candidates) if doc is not None), None)
        if found is not None:
            docs.append(found)
    return docs


def describe_input(role: str, value: Any, ancestors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One input's record (see ``webshards.fingerprints``) with the ids of its parents' stages, which are
    added to ``ancestors`` (each once), and whether its fingerprint is one those stages recorded writing."""
    record, places = describe(role, value)
    parents = link_parents(parent_lineage(record["kind"], places), ancestors)
    if parents:
        made = {o.get("fingerprint") for p in parents for o in ancestors[p].get("outputs", [])}
        record |= {"parents": parents, "matches_parent": record["fingerprint"] in made}
    return record


def link_parents(docs: list[dict[str, Any]], ancestors: dict[str, dict[str, Any]]) -> list[str]:
    """Add each document's stage and ancestors to ``ancestors`` (first seen wins); returns the stages' ids."""
    ids = []
    for doc in docs:
        parent = doc["stage"]
        ancestors.setdefault(parent["id"], parent)
        for key, stage in doc.get("ancestors", {}).items():
            ancestors.setdefault(key, stage)
        ids.append(parent["id"])
    return list(dict.fromkeys(ids))


def _each(named: dict[str, Any]) -> list[tuple[str, Any]]:
    """(role, value) pairs: a list is one pair per item, but a list of ``shards`` is one; None is left out."""
    pairs = []
    for role, value in named.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)) and role != "shards":
            pairs += [(role, item) for item in value]
        else:
            pairs.append((role, value))
    return pairs


def stage_id(record: dict[str, Any]) -> str:
    """``NAME-DIGEST`` over what the stage did (name, params, input and output fingerprints), not when."""
    what = {
        "name": record["name"],
        "params": record["params"],
        "inputs": [(i["role"], i["fingerprint"]) for i in record["inputs"]],
        "outputs": [(o["role"], o["fingerprint"]) for o in record["outputs"]],
    }
    return f"{record['name']}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]}"


def chain(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stage of a document (``stage`` and ``ancestors``, or a data card's ``ancestors`` alone), parents
    before children, each once."""
    stages = dict(doc.get("ancestors", {}))
    if "stage" in doc:
        stages[doc["stage"]["id"]] = doc["stage"]
    ordered: dict[str, dict[str, Any]] = {}

    def visit(key: str, path: tuple[str, ...]) -> None:
        if key in ordered or key not in stages or key in path:
            return
        for parent in stages[key].get("parents", []):
            visit(parent, (*path, key))
        ordered[key] = stages[key]

    for key in stages:
        visit(key, ())
    return list(ordered.values())


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON: dataclasses as dicts, paths as text, URLs with credentials redacted, non-finite
    numbers as None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return jsonable(obj.item())
    return redact_url(str(obj))


@functools.cache
def tool_version() -> dict[str, Any]:
    """This project's package version and, from a git checkout, its commit (and whether files differ)."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()  # fmt: skip
        if Path(top[0]).resolve() != root:
            return {"package": PACKAGE, "version": version}
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip() != ""  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError):
        return {"package": PACKAGE, "version": version}
    return {"package": PACKAGE, "version": version, "commit": top[1], "dirty": dirty}


def _command() -> list[str] | None:
    noted = invocation()
    return None if noted is None else [redact_url(arg) for arg in noted[0]]


def _command_start() -> float | None:
    noted = invocation()
    return None if noted is None else noted[1]


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="seconds")


def _run_info(runner: Any) -> dict[str, Any]:
    """Engine, workers and ranks of a ``RunnerOptions`` (read by name: this layer does not import it)."""
    if runner is None:
        return {}
    rank_world = runner.ranks() if hasattr(runner, "ranks") else (0, 1)
    return {"engine": getattr(runner, "engine", None), "workers": getattr(runner, "workers", None),
            "ranks": rank_world[1]}  # fmt: skip
