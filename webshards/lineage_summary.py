"""One line per curation stage of a lineage chain: what the model card's "Training data" section and
`data-tools lineage` show.

`name: samples in -> out`, the settings that decide which samples survive (filters and thresholds, a dedup
method), and the stage's other counts (removed per rule, duplicate groups, decontamination results), in
the order the lineage records them. Settings that only change how a stage runs are left out.
"""

from __future__ import annotations

from typing import Any

from webshards.lineage import chain

OPERATIONAL = {
    "batch_size", "device", "workers", "threads", "timeout", "retries", "fetching", "samples_per_shard",
    "shuffle_buffer", "format", "phase_timeout", "partitions", "generator", "jpeg_quality", "max_bytes",
    "max_pixels", "source_col", "caption_col", "input", "samples", "eval_samples",
}  # fmt: skip
"""Settings that change how a stage runs or stores, not which samples survive: left out of the summary."""
IN_OUT = ("samples_in", "samples_out")
LIST_SHOWN = 5


def summary_lines(doc: dict[str, Any], markdown: bool = True) -> list[str]:
    """`N. stage line` for each stage of a lineage document or data card, parents first, each once; the
    stage names in bold for markdown."""
    return [f"{i}. {stage_line(stage, markdown)}" for i, stage in enumerate(chain(doc), 1)]


def stage_line(stage: dict[str, Any], markdown: bool = True) -> str:
    """One stage: `**name**: in -> out samples; settings; other counts; eval sets` (parts left out when empty)."""
    counts = stage.get("counts", {})
    parts = [f"**{stage['name']}**" if markdown else stage["name"]]
    parts[0] += _flow(counts.get(IN_OUT[0]), counts.get(IN_OUT[1]))
    settings = _pairs({k: v for k, v in stage.get("params", {}).items() if k not in OPERATIONAL})
    others = _pairs({k: v for k, v in counts.items() if k not in IN_OUT})
    evals = [i["location"] for i in stage.get("inputs", []) if "eval" in i.get("role", "")]
    parts += [text for text in (settings, others) if text]
    if evals:
        parts.append("eval sets " + ", ".join(f"`{e}`" for e in evals))
    return "; ".join(parts)


def _flow(into: Any, out: Any) -> str:
    """`: 512 -> 307 samples`, `: 512 samples` (made, nothing read), or nothing when neither is known."""
    if into is None and out is None:
        return ""
    if into is None:
        return f": {_value(out)} samples"
    return f": {_value(into)} -> {_value(out) if out is not None else '?'} samples"


def _pairs(values: dict[str, Any]) -> str:
    """`key=value` for scalars that are set, `key=a,b` for a list of scalars (the first few), `key: a 1, b 2`
    for a dict of counts."""
    shown = []
    for key, value in values.items():
        if isinstance(value, list) and value and not any(isinstance(v, (dict, list)) for v in value):
            more = ",…" if len(value) > LIST_SHOWN else ""
            shown.append(f"{key}={','.join(_value(v) for v in value[:LIST_SHOWN])}{more}")
        elif isinstance(value, dict):
            inner = ", ".join(f"{k} {_value(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
            shown += [f"{key}: {inner}"] if inner else []
        elif value is not None and not isinstance(value, list) and value is not False:
            shown.append(f"{key}={_value(value)}")
    return ", ".join(shown)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
