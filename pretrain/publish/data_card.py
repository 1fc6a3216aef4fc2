"""The model card's "Training data" section, rendered from the run's data card (`pretrain.data.card`).

Short and readable: the shards read (spec, samples, fingerprint), then each curation stage once, parents
first, as `name: samples in -> out`, the settings that decide what is kept (filters and thresholds, dedup
method), and its other counts (removed per rule, duplicate groups, decontamination results). The whole
record travels beside the card as `data_card.json`.
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
NOT_RECORDED = (
    "The curation of the training data is not recorded: the run has no data card (`data_card.json`, written "
    "by runs of this project since issue 24)."
)


def training_data_section(card: dict[str, Any] | None) -> str:
    """The markdown of `## Training data` (without the heading) for a data card, or a sentence when absent."""
    if card is None:
        return NOT_RECORDED
    if card.get("synthetic"):
        return "Synthetic data (`data.train=synthetic`): generated samples, no curated data set."
    lines = [_source_line(source) for source in card.get("sources", [])]
    stages = chain(card)
    if stages:
        lines += [
            "",
            "How the shards were made (each stage once, inputs first; `data_card.json` has it all):",
        ]
        lines += [f"{i}. {stage_line(stage)}" for i, stage in enumerate(stages, 1)]
    else:
        lines += ["", "No lineage was recorded with these shards, so their curation is not known."]
    if card.get("changed_on_resume"):
        lines += [
            "",
            f"The data changed on {len(card['changed_on_resume'])} resume(s); see `data_card.json`.",
        ]
    return "\n".join(lines)


def _source_line(source: dict[str, Any]) -> str:
    samples = "unknown" if source.get("samples") is None else f"{source['samples']:,}"
    fingerprint = str(source.get("fingerprint") or "none")[:23]
    return (
        f"- `{source['location']}`: {source.get('shards', '?')} shards, {samples} samples, weight "
        f"{source.get('weight', 1.0):g}, fingerprint `{fingerprint}…`"
    )


def stage_line(stage: dict[str, Any]) -> str:
    """One stage: `**name**: in -> out samples; settings; other counts; eval sets` (parts left out when empty)."""
    counts = stage.get("counts", {})
    parts = [f"**{stage['name']}**"]
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
    """`key=value` for scalars that are set, `key: a 1, b 2` for a dict of counts."""
    shown = []
    for key, value in values.items():
        if isinstance(value, dict):
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
