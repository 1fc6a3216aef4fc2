"""The report's sections, each built from its inputs only when they are given (see ReportConfig)."""

from __future__ import annotations

import json
from html import escape
from typing import Any

import numpy as np

from data_tools.filter import summary_path
from data_tools.report import inputs
from data_tools.report.charts import bar_chart, log_curve
from data_tools.report.page import Section, TileRow, stages_table
from data_tools.report.sampling import check_keep_list, sample_deciles, sample_decisions, score_deciles
from webshards import outputs
from webshards.outputs import Location
from webshards.spec import count_samples

TOP_ENTRIES = 20
TOP_LANGUAGES = 15
LINEAGE_CHARS = 3000


def counts_section(cfg: Any, urls: list[str], files: list[Location]) -> Section:
    """Samples per stage, from each stage's own summary; lineage files (where present) folded below."""
    stages = [inputs.Stage("shards", cfg.shards, None, count_samples(urls), f"{len(urls)} shards")]
    if files:
        rows = sum(outputs.parquet_rows(f) for f in files)
        stages.append(inputs.Stage("embed", str(cfg.embeddings), None, rows, f"{len(files)} metadata files"))
    for keep_list in cfg.filters:
        stages.append(inputs.filter_stage(keep_list, _filter_summary(keep_list)))
    for keep_list in cfg.metaclips:
        stages.append(
            inputs.keep_list_stage("metaclip", keep_list, inputs.read_json(summary_path(keep_list)))
        )
    for folder in cfg.dedups:
        stages.append(inputs.dedup_stage(folder, _report(folder)))
    for folder in cfg.decontaminations:
        stages.append(inputs.report_stage("decontaminate", folder, _report(folder)))
    stages += [s for folder in cfg.reshards if (s := inputs.reshard_stage(folder)) is not None]
    blocks: list[Any] = [stages_table(stages)]
    outputs_given = [*cfg.filters, *cfg.metaclips, *cfg.dedups, *cfg.decontaminations, *cfg.reshards]
    for where, lineage in inputs.lineage_files(outputs_given):
        text = json.dumps(lineage, indent=1)[:LINEAGE_CHARS]
        blocks.append(
            f"<details><summary>lineage: {escape(str(where))}</summary><pre>{escape(text)}</pre></details>"
        )
    return Section("counts", "Counts per stage", blocks)


def _filter_summary(keep_list: Location) -> dict[str, Any]:
    summary = inputs.read_json(summary_path(keep_list))
    if not isinstance(summary, dict):
        raise ValueError(f"{summary_path(keep_list)}: not found (is {keep_list} a filter keep list?)")
    return summary


def _report(folder: Location) -> dict[str, Any]:
    report = inputs.read_json(outputs.join(folder, "report.json"))
    if not isinstance(report, dict):
        raise ValueError(f"{outputs.join(folder, 'report.json')}: not found or not a JSON object")
    return report


def filter_section(
    index: int,
    keep_list: Location,
    files: list[Location],
    urls: list[str],
    cfg: Any,
    rng: np.random.Generator,
) -> Section:
    """Kept samples and, per rule, samples it removed (each labelled with every rule it fails), and the
    filter's language counts where it has them."""
    summary = _filter_summary(keep_list)
    section = Section(f"filter-{index}", f"Filter: {outputs.name(keep_list)}")
    config = {k: v for k, v in (summary.get("config") or {}).items() if v is not None}
    section.blocks.append(f'<p class="note">{escape(json.dumps(config))}</p>')
    config_has_score = config.get("min_score") is not None or config.get("keep_fraction") is not None
    if not files and config_has_score:
        section.blocks.append(
            '<p class="warn">pass --embeddings (the filter\'s input) to see its decisions</p>'
        )
    else:  # a filter without a score rule may have run on the shards alone
        rows = (files, False) if files else (urls, True)
        decisions = sample_decisions(rows[0], summary, keep_list, urls, cfg.per_group, rng, rows[1])
        check_keep_list(keep_list, decisions)
        if decisions.disagree:
            note = f"{decisions.disagree} shown sample(s) disagree with the keep list: was it written with other inputs?"
            section.blocks.append(f'<p class="warn">{note}</p>')
        counts = {"kept": summary.get("kept"), **(summary.get("failed_rule") or {})}
        for name, tiles in decisions.groups.items():
            title = "kept" if name == "kept" else f"removed by {name}"
            total = counts.get(name)
            section.blocks.append(
                TileRow(
                    title, tiles, "" if total is None else f"{total:,} of {summary.get('samples', '?'):,}"
                )
            )
    languages = inputs.language_counts(summary)
    if languages:
        rows = [(lang, n, None) for lang, n in languages.most_common(TOP_LANGUAGES)]
        section.blocks.append(bar_chart(rows, f"languages (top {len(rows)} of {len(languages)})"))
    return section


def deciles_section(
    files: list[Location], urls: list[str], per_group: int, rng: np.random.Generator
) -> Section | None:
    """A row of random samples per CLIP-score decile, with its score range."""
    edges = score_deciles(files)
    if edges is None:
        return None
    section = Section("deciles", "CLIP-score deciles")
    for d, tiles in enumerate(sample_deciles(files, edges, urls, per_group, rng)):
        section.blocks.append(TileRow(f"decile {d + 1}: scores {edges[d]:.3f} to {edges[d + 1]:.3f}", tiles))
    return section


def dedup_section(index: int, folder: Location, per_group: int) -> Section:
    """The largest duplicate groups of a dedup output, kept member first."""
    report = _report(folder)
    section = Section(f"dedup-{index}", f"Duplicates: {outputs.name(folder)} ({report.get('method', '?')})")
    sizes = report.get("group_sizes") or {}
    section.blocks.append(f'<p class="note">group sizes (size: groups): {escape(json.dumps(sizes))}</p>')
    groups = inputs.dedup_groups(report, per_group)
    for i, tiles in enumerate(groups):
        section.blocks.append(TileRow(f"group {i + 1}", tiles, f"{len(tiles)} members shown"))
    if not groups:
        section.blocks.append('<p class="note">no duplicate groups</p>')
    return section


def decontam_section(index: int, folder: Location, per_group: int) -> Section:
    """Example pairs per eval set: the eval sample beside the training sample that matched it."""
    found = inputs.decontam_pairs(_report(folder), per_group)
    section = Section(f"decontaminate-{index}", f"Decontamination: {outputs.name(folder)}")
    for name, pairs in found:
        section.blocks.append(
            TileRow(name, [t for pair in pairs for t in pair], f"{len(pairs)} pairs", pairs=True)
        )
    if not any(pairs for _, pairs in found):
        section.blocks.append('<p class="note">no example pairs</p>')
    return section


def metaclip_section(index: int, keep_list: Location) -> Section | None:
    """MetaCLIP's entries: the most matched (kept drawn over matched) and all of them sorted, log scale."""
    found = inputs.entry_counts(keep_list)
    if not found or not found[0]:
        return None
    rows, t = found
    section = Section(f"metaclip-{index}", f"MetaCLIP entries: {outputs.name(keep_list)}")
    section.blocks.append(
        bar_chart(
            rows[:TOP_ENTRIES], f"top {min(TOP_ENTRIES, len(rows))} of {len(rows)} entries: kept / matched"
        )
    )
    series = {"matched": [r[1] for r in rows], "kept": [r[2] for r in rows]}
    section.blocks.append(log_curve(series, f"matches per entry, sorted (t = {t})", t))
    return section
