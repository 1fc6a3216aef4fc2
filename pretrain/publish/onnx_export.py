"""Export the image and text towers as two ONNX graphs, beside the open_clip export they come from.

`pretrain export --format onnx` writes the open_clip export (so the folder still loads in open_clip, is what
`pretrain push` publishes and what `--checkpoint` reads back) and adds:

- `image_encoder.onnx`: `pixel_values` float32 [batch, 3, H, W] (preprocessed) -> `image_embeds` [batch, D];
- `text_encoder.onnx`: `input_ids` int64 [batch, context_length] (open_clip's tokenizer) -> `text_embeds`;
- `onnx_config.json`: file and tensor names, opset, the preprocessing (size, mean, std, interpolation,
  resize mode), the tokenizer settings and the logit scale / bias, for users without this project.

Both outputs are `encode_image` / `encode_text`'s embeddings, **unnormalised** (as open_clip returns them):
normalise them before taking cosines. The batch dimension is dynamic. The graphs come from torch's
`torch.export`-based exporter (`dynamo=True`; the TorchScript one is deprecated since torch 2.9), opset
`OPSET`; each is checked with `onnx.checker` and run once with onnxruntime against the model before the
folder is published, so a graph that does not reproduce the model is refused, not written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pretrain.models.build import context_length, image_size, load_trained
from pretrain.publish.export import export_with, preprocess_cfg

OPSET = 18
"""ONNX opset of both graphs (torch's exporter default; onnxruntime >= 1.14 runs it)."""
TOLERANCE = 1e-4
"""Largest |onnxruntime - torch| allowed on the export's own check batch."""
IMAGE_FILE, TEXT_FILE, CONFIG_FILE = "image_encoder.onnx", "text_encoder.onnx", "onnx_config.json"
EXAMPLE_BATCH = 2  # not 1: torch.export would specialise a batch of 1 to a constant
INLINE_LIMIT = 1 << 30  # weights above 1 GiB go to a `.onnx.data` file (a protobuf holds at most 2 GiB)
NEEDED = ("onnx", "onnxscript", "onnxruntime")


class ImageEncoder(torch.nn.Module):
    """`model.encode_image` as a module of one input (what the exporter traces)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextEncoder(torch.nn.Module):
    """`model.encode_text` as a module of one input (what the exporter traces)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def check_installed() -> None:
    """Refuse, in one line, when the exporter's packages are missing (the `export` extra)."""
    missing = []
    for name in NEEDED:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(
            f"--format onnx needs {', '.join(missing)}: pip install 'clip-pretrain[export]' (or the packages)"
        )


def export_tower(module: torch.nn.Module, example: torch.Tensor, names: tuple[str, str], path: Path) -> None:
    """Export `module` (one input, one output, batch dimension dynamic) to `path` and check it.

    Raises ValueError naming the tower and the exporter's first line when it cannot be exported, or the
    largest difference when onnxruntime's output is not the module's.
    """
    import onnx

    tower = path.stem.removesuffix("_encoder")
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > INLINE_LIMIT
    try:
        with quiet():
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, opset_version=OPSET, verbose=False,
                input_names=[names[0]], output_names=[names[1]], external_data=big,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )  # fmt: skip
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # the exporter's many error kinds: one line naming the tower and the cause
        raise ValueError(f"cannot export the {tower} tower to ONNX: {reason(e)}") from None
    diff = max_difference(module, path, example, names[0])
    if not diff <= TOLERANCE:
        raise ValueError(
            f"cannot export the {tower} tower to ONNX: onnxruntime's output differs from the model's by "
            f"{diff:.2e} (> {TOLERANCE:g})"
        )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the exporter's progress lines, advice (warnings, torch's loggers) and the graph it prints on a
    failed trace off the console: the caller reports a failure as one line."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def reason(error: BaseException) -> str:
    """`Kind: first line` of the innermost cause (the exporter wraps torch.export's error in its own)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # the exporter colours its messages
    return f"{type(error).__name__}: {(text.splitlines() or [''])[0]}"


def max_difference(module: torch.nn.Module, path: Path, inputs: torch.Tensor, input_name: str) -> float:
    """Largest |onnxruntime(path) - module| over `inputs`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ours = module(inputs).numpy()
    theirs = session.run(None, {input_name: inputs.numpy()})[0]
    return float(np.abs(theirs - ours).max()) if theirs.shape == ours.shape else math.inf


def tokenizer_settings(tokenizer, length: int) -> dict:
    """What a user needs to make `input_ids`: the tokenizer's name and the context length."""
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
    name = getattr(inner, "name_or_path", None) or f"open_clip.{type(tokenizer).__name__}"
    return {
        "name": name,
        "library": "transformers" if inner is not None else "open_clip",
        "context_length": length,
        "load": "open_clip.get_tokenizer('local-dir:EXPORT_DIR')",
    }


def onnx_config(model: torch.nn.Module, tokenizer) -> dict:
    """The contents of `onnx_config.json` (see the module docstring)."""
    bias, size = getattr(model, "logit_bias", None), image_size(model)
    return {
        "opset": OPSET,
        "normalized": False,
        "image_encoder": {"file": IMAGE_FILE, "input": "pixel_values", "output": "image_embeds"},
        "text_encoder": {"file": TEXT_FILE, "input": "input_ids", "output": "text_embeds"},
        "image_size": [size, size],
        "preprocess_cfg": preprocess_cfg(model),
        "tokenizer": tokenizer_settings(tokenizer, context_length(model)),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "logit_bias": None if bias is None else float(bias.detach()),
    }


def write_onnx(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """Write both towers of `model` (eval mode, CPU, fp32) and `onnx_config.json` into `folder`."""
    check_installed()
    model = model.eval().float().cpu()
    size = image_size(model)
    images = torch.randn(EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = tokenizer(["a photo of a cat", "two dogs playing in the snow"])
    export_tower(ImageEncoder(model), images, ("pixel_values", "image_embeds"), folder / IMAGE_FILE)
    export_tower(TextEncoder(model), texts, ("input_ids", "text_embeds"), folder / TEXT_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(onnx_config(model, tokenizer), indent=2))


CARD_SECTION = """
## Use with ONNX Runtime
`image_encoder.onnx` and `text_encoder.onnx` give the unnormalised embeddings of `encode_image` /
`encode_text` (batch size dynamic); `onnx_config.json` holds the preprocessing and tokenizer settings.
```python
import onnxruntime as ort, open_clip
tokens = open_clip.get_tokenizer("local-dir:PATH_TO_THIS_FOLDER")(["a photo of a cat"]).numpy()
image_encoder = ort.InferenceSession("PATH_TO_THIS_FOLDER/image_encoder.onnx")
text_encoder = ort.InferenceSession("PATH_TO_THIS_FOLDER/text_encoder.onnx")
image_embeds = image_encoder.run(None, {"pixel_values": pixels})[0]  # float32 [N, 3, H, W], preprocessed
text_embeds = text_encoder.run(None, {"input_ids": tokens})[0]  # int64 [N, context_length]
```
"""


def add_card_section(card: Path) -> None:
    """Put the ONNX usage lines after the card's open_clip `## Use` section."""
    text = card.read_text()
    head, sep, rest = text.partition("\n## Training\n")
    card.write_text(head + CARD_SECTION + sep + rest if sep else text + CARD_SECTION)


def export_onnx(checkpoint: str | Path, output: str | Path, weights: str = "final") -> Path:
    """`export` (the open_clip folder) plus both towers as ONNX, all under a temp name then renamed.

    Raises ValueError, one line, when a package is missing or a tower cannot be exported.
    """
    check_installed()
    return export_with(checkpoint, output, weights, add_onnx, "onnx")


def add_onnx(folder: Path) -> None:
    """Both towers of the export in `folder` as ONNX, from its own weights (as a user loading the folder gets
    them), and the card's ONNX section."""
    bundle = load_trained(folder)
    write_onnx(bundle.model, bundle.tokenizer, folder)
    add_card_section(folder / "README.md")
