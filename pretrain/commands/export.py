"""`pretrain export`: a checkpoint as an open_clip hub folder."""

from __future__ import annotations

import argparse

HELP = "export a checkpoint to the open_clip hub layout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `export`."""
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint folder or run directory (its latest)")
    add("--output", required=True, help="folder to write (replaced atomically)")
    add("--weights", choices=["final", "ensemble"], default="final",
        help="final: the checkpoint's weights (default); ensemble: its running weight average "
        "(train.weight_ensemble_every)")  # fmt: skip
    add("--format", choices=["open_clip", "onnx"], default="open_clip",
        help="open_clip: the open_clip hub folder (default); onnx: that folder plus image_encoder.onnx, "
        "text_encoder.onnx and onnx_config.json (docs/export.md#onnx)")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Export and say where."""
    from pretrain.publish.export import export
    from pretrain.publish.onnx_export import export_onnx

    write = {"open_clip": export, "onnx": export_onnx}[args.format]
    print(f"exported to {write(args.checkpoint, args.output, args.weights)}")
