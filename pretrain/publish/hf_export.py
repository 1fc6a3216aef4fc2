"""`pretrain export --format transformers`: the open_clip export plus the files of a Hugging Face
transformers folder, so `CLIPModel.from_pretrained(DIR)` (SigLIP models: `SiglipModel`) and
`AutoProcessor.from_pretrained(DIR)` load it.

The folder keeps the open_clip files (as the Hub's open_clip repos do), so open_clip, `pretrain eval` and
`pretrain push` read it as before. transformers is not needed to write it: `config.json`, the weights, the
tokenizer's files (open_clip's BPE as CLIPTokenizer's `vocab.json`/`merges.txt`; a Hugging Face tokenizer's
own, which open_clip's export already saved) and the image processor's settings are written from open_clip's
model, tokenizer and preprocessing here. A model with a logit bias is a SigLIP model (`hf_siglip`), any other
a CLIP (`hf_clip`). Models transformers cannot express are refused (`NotExpressible`, one line) before
anything is written.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from open_clip.tokenizer import HFTokenizer, SimpleTokenizer, _clean_canonicalize, _clean_lower
from safetensors.torch import save_file
from torch import nn

from pretrain.models.build import load_trained
from pretrain.publish import hf_clip, hf_siglip
from pretrain.publish.export import export_with
from pretrain.publish.hf_clip import NotExpressible, text_tower

# open_clip's interpolation names -> PIL resample codes (what CLIPImageProcessor's `resample` holds)
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
         "special_tokens_map.json", "preprocessor_config.json")  # fmt: skip
CLIP_USE = """
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
SIGLIP_USE = """
### With Hugging Face transformers
This folder also holds a transformers `SiglipModel` with its processor (same embeddings as open_clip's; the
text is padded to the context length, as open_clip pads it):
```python
from transformers import AutoProcessor, SiglipModel
model = SiglipModel.from_pretrained("PATH_TO_THIS_FOLDER")
processor = AutoProcessor.from_pretrained("PATH_TO_THIS_FOLDER")
inputs = processor(text=["a photo of a cat"], images=image, return_tensors="pt", padding="max_length", truncation=True)
out = model(**inputs)  # out.image_embeds, out.text_embeds (normalised), out.logits_per_image (with the bias)
```
"""


@dataclass(frozen=True)
class Target:
    """A transformers model class an open_clip model is written as: what it cannot express, its config, its
    weights, the processor class that pairs with it and the model card's loading lines."""

    name: str
    unsupported: Callable[[nn.Module, object], str | None]
    config: Callable[[nn.Module, object], dict]
    state_dict: Callable[[nn.Module], dict]
    processor: str
    use: str


CLIP = Target("CLIPModel", hf_clip.unsupported, hf_clip.clip_config, hf_clip.clip_state_dict, "CLIPProcessor",
              CLIP_USE)  # fmt: skip
SIGLIP = Target("SiglipModel", hf_siglip.unsupported, hf_siglip.siglip_config, hf_siglip.siglip_state_dict,
                "SiglipProcessor", SIGLIP_USE)  # fmt: skip


def target_of(model: nn.Module) -> Target:
    """SiglipModel for a model with open_clip's SigLIP logit bias, CLIPModel for any other."""
    return SIGLIP if getattr(model, "logit_bias", None) is not None else CLIP


def tokenizer_files(tokenizer: SimpleTokenizer, context_length: int, siglip: bool = False) -> dict[str, str]:
    """CLIPTokenizer's files for open_clip's BPE: its vocabulary, its merges in rank order, its special tokens.
    For CLIP it pads with the end-of-text token, so the first one still marks where the text ends (hf_clip's
    pooling); for SigLIP with token 0 as open_clip does (its text is pooled at the last position, padding
    included) and without an attention mask, which open_clip's SigLIP text tower does not take."""
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    sot, eot = tokenizer.decoder[tokenizer.sot_token_id], tokenizer.decoder[tokenizer.eot_token_id]
    pad = tokenizer.decoder[0] if siglip else eot
    special = {"bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": pad}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "errors": "replace", "clean_up_tokenization_spaces": False, **special}  # fmt: skip
    if siglip:
        config["model_input_names"] = ["input_ids"]
    return {
        "vocab.json": json.dumps(tokenizer.encoder, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


def clean_normalizers(clean_fn: Callable[[str], str]) -> list:
    """tokenizers' normalizers doing what open_clip's text cleaning `clean_fn` does before its Hugging Face
    tokenizer (`tokenizer_kwargs.clean`; all but its ftfy repair of broken text and unescaping of HTML entities
    such as `&amp;`, which leave ordinary text as it is):
    `canonicalize` (SigLIP's) drops punctuation and lowercases, `lower` lowercases, all collapse whitespace."""
    from tokenizers import Regex, normalizers  # transformers' own dependency, as is open_clip's HFTokenizer

    spaces = [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if clean_fn is _clean_canonicalize:
        punctuation = Regex("[" + re.escape(string.punctuation) + "]")
        return [normalizers.Replace("_", " "), normalizers.Replace(punctuation, ""), normalizers.Lowercase(),
                *spaces]  # fmt: skip
    return [*spaces, normalizers.Lowercase()] if clean_fn is _clean_lower else spaces


def hf_tokenizer_files(folder: Path, tokenizer: HFTokenizer, context_length: int) -> dict[str, str]:
    """The Hugging Face tokenizer open_clip's export saved in `folder`, made to tokenize as open_clip does:
    its `tokenizer.json` (where it has one) cleans the text first as open_clip does before calling it (cleaning
    twice changes nothing, so open_clip reading the folder is unchanged), its config sets open_clip's context
    length and no attention mask (SigLIP's text tower takes none)."""
    from tokenizers import Tokenizer, normalizers

    saved = folder / "tokenizer_config.json"
    config = json.loads(saved.read_text()) if saved.is_file() else {}
    config.update(model_max_length=context_length, model_input_names=["input_ids"])
    files = {"tokenizer_config.json": json.dumps(config, indent=2)}
    if (folder / "tokenizer.json").is_file():
        fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
        own = [fast.normalizer] if fast.normalizer is not None else []
        fast.normalizer = normalizers.Sequence([*clean_normalizers(tokenizer.clean_fn), *own])
        files["tokenizer.json"] = fast.to_str(pretty=True)
    return files


def target_tokenizer_files(target: Target, folder: Path, tokenizer: object, context_length: int) -> dict:
    """The tokenizer files `target` needs beside the open_clip export in `folder`."""
    if isinstance(tokenizer, HFTokenizer):  # its files are there already
        return hf_tokenizer_files(folder, tokenizer, context_length)
    return tokenizer_files(tokenizer, context_length, siglip=target is SIGLIP)


def processor_config(preprocess: dict, processor: str = "CLIPProcessor") -> dict:
    """The image processor's settings for open_clip's eval transform (`preprocess_cfg` of the export): resize
    the shorter side and centre-crop (`shortest`, CLIPImageProcessor) or squash to the size (`squash`; for
    SiglipProcessor SiglipImageProcessor, which only squashes), scale to [0, 1], normalise."""
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
    crop = {"do_center_crop": shortest, "crop_size": {"height": height, "width": width}}
    squash_only = processor == "SiglipProcessor" and not shortest
    return {
        "image_processor_type": "SiglipImageProcessor" if squash_only else "CLIPImageProcessor",
        "processor_class": processor,
        "do_resize": True,
        "size": {"shortest_edge": height} if shortest else {"height": height, "width": width},
        "resample": RESAMPLE[interpolation],
        **({} if squash_only else crop),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess["mean"]),
        "image_std": list(preprocess["std"]),
        "do_convert_rgb": True,
    }


def add_use_section(card: str, use: str = CLIP_USE) -> str:
    """The model card with the transformers loading lines `use` after open_clip's (before `## Training`)."""
    return card.replace("\n## Training\n", use + "\n## Training\n", 1)


def write_transformers(folder: str | Path, source: str | Path | None = None) -> Path:
    """Add transformers' files (CLIPModel or SiglipModel: `target_of`) to the open_clip export `folder` (its
    model as open_clip loads it) and the loading lines to its model card; `NotExpressible` (nothing written,
    the message naming `source`, default `folder`) when transformers cannot hold it."""
    folder = Path(folder)
    bundle = load_trained(folder)
    target = target_of(bundle.model)
    problem = target.unsupported(bundle.model, bundle.tokenizer)
    if problem:
        raise NotExpressible(f"cannot export {source or folder} to transformers' {target.name}: {problem}")
    preprocess = json.loads((folder / "open_clip_config.json").read_text())["preprocess_cfg"]
    processor = processor_config(preprocess, target.processor)
    context_length = text_tower(bundle.model).positional_embedding.shape[0]
    files = target_tokenizer_files(target, folder, bundle.tokenizer, context_length)
    files["config.json"] = json.dumps(target.config(bundle.model, bundle.tokenizer), indent=2)
    files["preprocessor_config.json"] = json.dumps(processor, indent=2)
    save_file(target.state_dict(bundle.model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name, text in files.items():
        (folder / name).write_text(text)
    card = folder / "README.md"
    if card.is_file():
        card.write_text(add_use_section(card.read_text(), target.use))
    return folder


def export_transformers(checkpoint: str | Path, output: str | Path, weights: str = "final") -> Path:
    """`export` (open_clip's files, card, data card) plus transformers' files, the whole folder written
    under a temp name and renamed; a model transformers cannot express leaves `output` as it was."""
    return export_with(
        checkpoint, output, weights, lambda folder: write_transformers(folder, checkpoint), "transformers"
    )
