"""From duplicate pairs to groups, one kept sample per group, and the output files every method writes.

Groups are the connected components of the duplicate pairs: if a~b and b~c, all three form one group and
one of them is kept, even when a and c are not duplicates of each other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from webshards import outputs
from webshards.outputs import Location

DUPLICATES_SCHEMA = pa.schema(
    [("key", pa.string()), ("uid", pa.string()), ("group", pa.int64()), ("keep", pa.bool_())]
)
KEEP_SCHEMA = pa.schema([("uid", pa.string())])
EXAMPLE_GROUPS = 5
EXAMPLE_MEMBERS = 10


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """The component of each of ``n`` items under the ``(E, 2)`` index pairs, as its smallest member.

    Vectorised union-find: hook the larger root onto the smaller, then jump pointers until every item
    points at its root; repeat until no edge joins two roots. ``parent[i] <= i`` always, so no cycles.
    """
    parent = np.arange(n, dtype=np.int64)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    a, b = edges[:, 0], edges[:, 1]
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        ra, rb = ra[differ], rb[differ]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        parent = _compress(parent)


def _compress(parent: np.ndarray) -> np.ndarray:
    while True:
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            return parent
        parent = jumped


def group_ids(labels: np.ndarray) -> np.ndarray:
    """Group id per item from any component labelling: -1 alone, else 0, 1, ... in order of first member."""
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, labels = np.unique(labels, return_inverse=True)
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    roots = first[labels]
    in_group = np.bincount(roots, minlength=n)[roots] >= 2
    groups = np.full(n, -1, dtype=np.int64)
    groups[in_group] = np.unique(roots[in_group], return_inverse=True)[1]
    return groups


def choose_keep(groups: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Keep every ungrouped item and, per group, the member with the highest priority (first on ties)."""
    keep = groups < 0
    members = np.flatnonzero(~keep)
    order = members[np.lexsort((members, -priority[members], groups[members]))]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = groups[order][1:] != groups[order][:-1]
    keep[order[starts]] = True
    return keep


def write_results(
    output: Location, tables: Iterable[pa.Table], groups: np.ndarray, keep: np.ndarray, info: dict[str, Any]
) -> dict[str, Any]:
    """Write duplicates.parquet, keep.parquet, then report.json (last) from per-shard tables in item order.

    ``tables`` carry ``key``, ``uid`` and ``caption`` for the items ``groups``/``keep`` index, in order.
    """
    sizes = np.bincount(groups[groups >= 0])
    examples = set(np.argsort(-sizes, kind="stable")[:EXAMPLE_GROUPS].tolist())
    members: dict[int, list[dict[str, Any]]] = {g: [] for g in examples}
    start = 0
    with (
        outputs.staged(outputs.join(output, "duplicates.parquet")) as dup_tmp,
        outputs.staged(outputs.join(output, "keep.parquet")) as keep_tmp,
        pq.ParquetWriter(dup_tmp, DUPLICATES_SCHEMA) as duplicates,
        pq.ParquetWriter(keep_tmp, KEEP_SCHEMA) as kept,
    ):
        for table in tables:
            part = slice(start, start + table.num_rows)
            start += table.num_rows
            columns = {"key": table["key"], "uid": table["uid"], "group": groups[part], "keep": keep[part]}
            duplicates.write_table(pa.table(columns, schema=DUPLICATES_SCHEMA))
            kept.write_table(pa.table({"uid": table["uid"].filter(pa.array(keep[part]))}, schema=KEEP_SCHEMA))
            _collect_examples(table, groups[part], keep[part], members)
    if start != len(groups):
        raise ValueError(f"the shard tables hold {start} items, the groups {len(groups)}")
    report = {**info, **_counts(groups, keep, sizes), "examples": _examples(members)}
    outputs.write_json(outputs.join(output, "report.json"), report)
    return report


def _collect_examples(
    table: pa.Table, groups: np.ndarray, keep: np.ndarray, members: dict[int, list[dict[str, Any]]]
) -> None:
    for row in np.flatnonzero(np.isin(groups, list(members))):
        group = int(groups[row])
        if len(members[group]) < EXAMPLE_MEMBERS:
            caption = table["caption"][row].as_py() if "caption" in table.column_names else None
            key, uid = table["key"][row].as_py(), table["uid"][row].as_py()
            members[group].append({"key": key, "uid": uid, "caption": caption, "keep": bool(keep[row])})


def _examples(members: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"group": g, "members": rows} for g, rows in sorted(members.items())]


def _counts(groups: np.ndarray, keep: np.ndarray, sizes: np.ndarray) -> dict[str, Any]:
    """Totals and the histogram of group sizes ({size: number of groups})."""
    histogram = Counter(sizes.tolist())
    return {
        "items": len(groups),
        "groups": len(sizes),
        "in_groups": int((groups >= 0).sum()),
        "kept": int(keep.sum()),
        "removed": int((~keep).sum()),
        "group_sizes": {str(size): histogram[size] for size in sorted(histogram)},
    }
