"""The model card's "Training data" section, rendered from the run's data card (`pretrain.data.card`).

Short and readable: the shards read (spec, samples, fingerprint), then each curation stage once, parents
first, one line each (`webshards.lineage_summary`: samples in -> out, filters and thresholds, dedup and
decontamination results). The whole record travels beside the card as `data_card.json`.
"""

from __future__ import annotations

from typing import Any

from webshards.lineage_summary import summary_lines

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
    stages = summary_lines(card)
    if stages:
        lines += [
            "",
            "How the shards were made (each stage once, inputs first; `data_card.json` has it all):",
        ]
        lines += stages
    else:
        lines += ["", "No lineage was recorded with these shards, so their curation is not known."]
    if card.get("recorded_on_resume"):
        lines += ["", "Recorded when the run resumed: what the steps before that read is not recorded."]
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
