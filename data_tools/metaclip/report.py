"""What ``metaclip`` writes beside its keep list: ``STEM_entry_counts.json`` and ``STEM_entry_counts.png``.

The json holds the totals (pool size, pairs without a uid, pairs matching no entry, which are dropped as in
the paper, matched, kept, the expected kept count) and, for every entry that matched at least one pair, its
matched count before balancing, its kept count after and its keep probability, entries by count, largest
first. The png is the paper's view of balancing: entry counts sorted from largest to smallest on log-log
axes, before and after (each curve sorted on its own), with the line at ``t``; head entries (left of where "before" crosses ``t``) are
flattened to about ``t``, tail entries are kept whole, so "after" follows "before" there.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from data_tools.metaclip.balance import entry_probabilities
from data_tools.metaclip.config import MetaclipConfig
from data_tools.metaclip.entries import Entries
from webshards import outputs
from webshards.outputs import Location


def counts_path(output: Location) -> Location:
    return outputs.beside(output, "_entry_counts.json")


def plot_path(output: Location) -> Location:
    return outputs.beside(output, "_entry_counts.png")


def write_report(
    output: Location, entries: Entries, cfg: MetaclipConfig, before: np.ndarray, totals: dict[str, Any]
) -> dict[str, Any]:
    """Write the json and png beside the keep list ``output``; returns the json's totals."""
    after = totals.pop("after")
    prob = entry_probabilities(before, cfg.t)
    summary = {
        "keep_list": str(output),
        "pool": totals["samples"],
        "no_uid": totals["no_uid"],
        "unmatched": totals["samples"] - totals["no_uid"] - totals["matched"],
        "matched": totals["matched"],
        "kept": totals["kept"],
        "expected_kept": round(totals["expected_kept"], 3),
        "kept_fraction": totals["kept"] / totals["samples"] if totals["samples"] else 0.0,
        "entries": len(entries.names),
        "duplicate_entries_merged": entries.duplicates,
        "entries_matched": int(np.count_nonzero(before)),
        "head_entries": int(np.count_nonzero(before > cfg.t)),
        "config": asdict(cfg),
    }
    order = np.argsort(-before, kind="stable")
    order = order[before[order] > 0]
    per_entry = {
        entries.names[i]: {"before": int(before[i]), "after": int(after[i]), "probability": float(prob[i])}
        for i in order
    }
    outputs.write_json(counts_path(output), {**summary, "t": cfg.t, "entry_counts": per_entry})
    plot_counts(before, after, cfg.t, plot_path(output))
    return summary


def plot_counts(before: np.ndarray, after: np.ndarray, t: int, path: Location) -> None:
    """Entry counts sorted largest first, before and after balancing, log-log, with the line at ``t``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for counts, label, colour in ((before, "before (matched)", "0.6"), (after, "after (kept)", "tab:blue")):
        ranked = np.sort(counts[counts > 0])[::-1]
        ax.plot(np.arange(1, len(ranked) + 1), ranked, color=colour, label=label)
    ax.axhline(t, color="tab:red", linestyle="--", label=f"t = {t:,}")
    ax.set(xscale="log", yscale="log", xlabel="entries, sorted by count", ylabel="pairs per entry")
    ax.set_title(f"MetaCLIP balancing: {int(np.count_nonzero(before))} entries matched")
    ax.legend()
    fig.tight_layout()
    with outputs.staged(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
