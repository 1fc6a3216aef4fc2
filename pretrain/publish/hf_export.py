"""`pretrain export --format transformers`: the open_clip export plus the files of a Hugging Face
transformers CLIP folder, so `CLIPModel.from_pretrained(DIR)` and `CLIPProcessor.from_pretrained(DIR)` load it.

The folder keeps the open_clip files (as the Hub's open_clip repos do), so open_clip, `pretrain eval` and
`pretrain push` read it as before. transformers is not needed to write it: `config.json`, the weights, the
tokenizer's `vocab.json`/`merges.txt` (open_clip's BPE, which is CLIP's) and the image processor's settings are
written from open_clip's model, tokenizer and preprocessing here. Models transformers cannot express are
refused (`NotExpressible`, one line) before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file

from pretrain.models.build import load_trained
from pretrain.publish.export import export_with
from pretrain.publish.hf_clip import NotExpressible, clip_config, clip_state_dict, text_tower, unsupported

# open_clip's interpolation names -> PIL resample codes (what CLIPImageProcessor's `resample` holds)
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
         "special_tokens_map.json", "preprocessor_config.json")  # fmt: skip
USE = """
### With Hugging Face transformers
This folder also holds a transformers `CLIPModel` with its processor (same embeddings as open_clip's):
```python
from transformers import CLIPModel, CLIPProcessor
model = CLIPModel.from_pretrained("PATH_TO_THIS_FOLDER")
processor = CLIPProcessor.from_pretrained("PATH_TO_THIS_FOLDER")
inputs = processor(text=["a photo of a cat"], images=image, return_tensors="pt", padding=True)
out = model(**inputs)  # out.image_embeds, out.text_embeds (normalised), out.logits_per_image
```
"""


def tokenizer_files(tokenizer: SimpleTokenizer, context_length: int) -> dict[str, str]:
    """CLIPTokenizer's files for open_clip's BPE: its vocabulary, its merges in rank order, its special tokens;
    padding with the end-of-text token, so the first one still marks where the text ends (hf_clip's pooling)."""
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    sot, eot = tokenizer.decoder[tokenizer.sot_token_id], tokenizer.decoder[tokenizer.eot_token_id]
    special = {"bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "errors": "replace", "clean_up_tokenization_spaces": False, **special}  # fmt: skip
    return {
        "vocab.json": json.dumps(tokenizer.encoder, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


def processor_config(preprocess: dict) -> dict:
    """CLIPImageProcessor's settings for open_clip's eval transform (`preprocess_cfg` of the export): resize
    the shorter side and centre-crop (`shortest`) or squash to the size (`squash`), scale to [0, 1], normalise."""
    size = preprocess["size"]
    height, width = (size, size) if isinstance(size, int) else size
    mode, interpolation = (
        preprocess.get("resize_mode", "shortest"),
        preprocess.get("interpolation", "bicubic"),
    )
    if (
        mode not in ("shortest", "squash")
        or interpolation not in RESAMPLE
        or (mode == "shortest" and height != width)
    ):
        raise NotExpressible(
            f"image preprocessing resize_mode={mode!r}, interpolation={interpolation!r}, size={size} "
            "(CLIPImageProcessor: shortest-side resize and centre crop to a square, or a squash)"
        )
    shortest = mode == "shortest"
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": height} if shortest else {"height": height, "width": width},
        "resample": RESAMPLE[interpolation],
        "do_center_crop": shortest,
        "crop_size": {"height": height, "width": width},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess["mean"]),
        "image_std": list(preprocess["std"]),
        "do_convert_rgb": True,
    }


def add_use_section(card: str) -> str:
    """The model card with the transformers loading lines after open_clip's (before `## Training`)."""
    return card.replace("\n## Training\n", USE + "\n## Training\n", 1)


def write_transformers(folder: str | Path, source: str | Path | None = None) -> Path:
    """Add transformers' CLIP files to the open_clip export `folder` (its model as open_clip loads it) and
    the loading lines to its model card; `NotExpressible` (nothing written, the message naming `source`,
    default `folder`) when transformers cannot hold it."""
    folder = Path(folder)
    bundle = load_trained(folder)
    problem = unsupported(bundle.model, bundle.tokenizer)
    if problem:
        raise NotExpressible(f"cannot export {source or folder} to transformers' CLIPModel: {problem}")
    preprocess = json.loads((folder / "open_clip_config.json").read_text())["preprocess_cfg"]
    processor = processor_config(preprocess)
    context_length = text_tower(bundle.model).positional_embedding.shape[0]
    files = tokenizer_files(bundle.tokenizer, context_length)
    files["config.json"] = json.dumps(clip_config(bundle.model, bundle.tokenizer), indent=2)
    files["preprocessor_config.json"] = json.dumps(processor, indent=2)
    save_file(clip_state_dict(bundle.model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name, text in files.items():
        (folder / name).write_text(text)
    card = folder / "README.md"
    if card.is_file():
        card.write_text(add_use_section(card.read_text()))
    return folder


def export_transformers(checkpoint: str | Path, output: str | Path, weights: str = "final") -> Path:
    """`export` (open_clip's files, card, data card) plus transformers' CLIP files, the whole folder written
    under a temp name and renamed; a model transformers cannot express leaves `output` as it was."""
    return export_with(
        checkpoint, output, weights, lambda folder: write_transformers(folder, checkpoint), "transformers"
    )
