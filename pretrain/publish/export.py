"""Export a trained model to the open_clip hub layout, loadable with `open_clip ... "local-dir:DIR"`."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file

from pretrain.data.card import CARD_FILE
from pretrain.models.build import (
    load_checkpoint_model,
)
from pretrain.models.checkpoint import load_trainer_state, resolve_checkpoint, verify_checkpoint
from pretrain.publish.model_card import model_card
from pretrain.training.ensemble import apply_ensemble
from pretrain.training.metrics import read_metrics


def preprocess_cfg(model) -> dict:
    """Image normalisation and resize settings the model was trained with (open_clip's keys)."""
    visual = model.visual
    cfg = {"size": visual.image_size, "mean": list(visual.image_mean), "std": list(visual.image_std)}
    cfg.update(
        {
            k: v
            for k, v in getattr(visual, "preprocess_cfg", {}).items()
            if k in ("interpolation", "resize_mode")
        }
    )
    return cfg


def copy_data_card(run_dir: Path, export_dir: Path) -> dict | None:
    """Copy the run's `data_card.json` (which shards it read, how they were made) into the export; returns
    it, or None when the run has none (the card then says the data's curation is not recorded)."""
    card = run_dir / CARD_FILE
    if not card.is_file():
        return None
    shutil.copyfile(card, export_dir / CARD_FILE)
    return json.loads(card.read_text())


def export(checkpoint: str | Path, output: str | Path, weights: str = "final") -> Path:
    """Write open_clip_config.json, open_clip_model.safetensors, tokenizer files, README.md and the run's
    data_card.json (when it has one) to `output`;
    `weights="ensemble"` exports the checkpoint's running weight average instead of its weights."""
    folder = resolve_checkpoint(checkpoint)
    verify_checkpoint(folder)  # before any file of it is read
    state = load_trainer_state(folder)
    cfg = state["config"]
    bundle = load_checkpoint_model(folder)
    if weights == "ensemble":
        apply_ensemble(folder, bundle.model)
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {"model_cfg": bundle.model_cfg, "preprocess_cfg": preprocess_cfg(bundle.model)}
    (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in bundle.model.state_dict().items()}
    save_file(tensors, str(tmp / "open_clip_model.safetensors"))
    if hasattr(bundle.tokenizer, "save_pretrained"):  # HF tokenizers; open_clip's BPE needs no files
        bundle.tokenizer.save_pretrained(str(tmp))
    rows = read_metrics(folder.parent.parent / "metrics.jsonl")
    data = copy_data_card(folder.parent.parent, tmp)
    card = model_card(bundle.name, config["model_cfg"], cfg, rows, state["step"], str(folder), data)
    (tmp / "README.md").write_text(card)
    return _replace(tmp, out)


def export_with(
    checkpoint: str | Path, output: str | Path, weights: str, add_format: Callable[[Path], None], suffix: str
) -> Path:
    """`export` into `OUTPUT.SUFFIX.tmp`, then `add_format(folder)` writes another format's files beside
    open_clip's; the folder takes `output`'s name only once all is written, so a format that refuses the model
    leaves `output` as it was."""
    out = Path(output)
    stage = out.with_name(f"{out.name}.{suffix}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        add_format(export(checkpoint, stage, weights))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _replace(stage, out)


def _replace(folder: Path, out: Path) -> Path:
    """`folder` renamed to `out`, replacing what was there."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(folder, out)
    return out
