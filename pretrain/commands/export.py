"""`pretrain export`: a checkpoint as an open_clip hub folder."""

from __future__ import annotations

import argparse

HELP = "export a checkpoint to the open_clip hub layout (and transformers' CLIP layout)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `export`."""
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint folder or run directory (its latest)")
    add("--output", required=True, help="folder to write (replaced atomically)")
    add("--weights", choices=["final", "ensemble"], default="final",
        help="final: the checkpoint's weights (default); ensemble: its running weight average "
        "(train.weight_ensemble_every)")  # fmt: skip
    add("--format", choices=["open_clip", "transformers", "onnx"], default="open_clip",
        help="open_clip: the open_clip hub folder (default); transformers: that plus a transformers CLIPModel "
        "(SiglipModel for SigLIP models) folder (config.json, model.safetensors, tokenizer and processor files); onnx: that folder plus "
        "image_encoder.onnx, text_encoder.onnx and onnx_config.json (docs/export.md)")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Export and say where."""
    from pretrain.publish.export import export
    from pretrain.publish.hf_export import export_transformers
    from pretrain.publish.onnx_export import export_onnx

    write = {"open_clip": export, "transformers": export_transformers, "onnx": export_onnx}[args.format]
    print(f"exported to {write(args.checkpoint, args.output, args.weights)}")
