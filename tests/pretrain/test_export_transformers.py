"""`pretrain export --format transformers` against the real transformers package: `CLIPModel` and `CLIPProcessor`
load the folder and give our model's image and text embeddings for the 64 held-out demo images and captions;
what transformers cannot express is refused with one line, nothing written."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import (
    ROOT,
    assert_same_direction,
    features,
    one_torch_thread,
    refused,
    train_in_process,
    write_open_clip_folder,
)

from pretrain.cli import main
from pretrain.models.build import load_trained
from pretrain.publish.hf_clip import NotExpressible, unsupported
from pretrain.publish.hf_export import FILES, write_transformers
from pretrain.publish.push import export_files

transformers = pytest.importorskip("transformers")
LONG = " ".join(["a small red circle next to a large blue square"] * 6)  # past the 32-token context


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory) -> Path:
    """A folder with a tiny-clip run (3 steps) and a tiny-siglip run (1 step)."""
    root = tmp_path_factory.mktemp("hf-export")
    shards = [f"data.train={demo_data}/train/{{00000..00003}}.tar", "train.batch_size=16"]
    with one_torch_thread():
        train_in_process(root, [*shards, "train.steps=3"], name="clip")
        train_in_process(root, [*shards, "train.steps=1", "model.name=tiny-siglip"], name="siglip")
    return root


def docs_block(kind: str) -> str:
    """The first ```KIND block of docs/export.md's "Hugging Face transformers" section."""
    body = (
        (ROOT / "docs/export.md")
        .read_text()
        .split("## Hugging Face transformers\n", 1)[1]
        .split("\n## ", 1)[0]
    )
    return body.split(f"```{kind}\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def exported(runs) -> Path:
    """The tiny-clip run exported by the docs' command (`.venv/bin/pretrain export ... --format transformers`)."""
    argv = shlex.split(docs_block("bash").replace("runs/demo/hf", str(runs / "export")))
    assert argv[:2] == [".venv/bin/pretrain", "export"] and "transformers" in argv
    assert main([a.replace("runs/demo", str(runs / "clip")) for a in argv[1:]]) == 0
    return runs / "export"


def test_clip_model_and_processor_give_our_embeddings(exported, runs, held_out):
    images, captions = held_out
    assert len(images) == 64
    hf, info = transformers.CLIPModel.from_pretrained(str(exported), output_loading_info=True)
    assert not any(info.values()), info  # every weight read, none left over or made up
    processor = transformers.CLIPProcessor.from_pretrained(str(exported))
    ours = load_trained(runs / "clip")  # the checkpoint itself, not the export
    hf.eval(), ours.model.eval()
    texts = [*captions, LONG]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = hf(**inputs)
        pixels = torch.stack([ours.preprocess_val(image) for image in images])
        image_ours = ours.model.encode_image(pixels, normalize=True)
        text_ours = ours.model.encode_text(ours.tokenizer(texts), normalize=True)
        assert_same_direction(
            features(hf.get_image_features(pixel_values=inputs["pixel_values"])), image_ours
        )
    assert_same_direction(out.image_embeds, image_ours)
    assert_same_direction(out.text_embeds, text_ours)  # the long caption: truncated, pooled at its last token
    expected = ours.model.logit_scale.exp() * image_ours @ text_ours.T
    torch.testing.assert_close(out.logits_per_image, expected, rtol=1e-4, atol=1e-4)


def test_docs_lines_run_as_written(exported, capsys):
    code = docs_block("python").replace("runs/demo/hf", str(exported))
    exec(compile(code, "docs/export.md", "exec"), {})
    probabilities = torch.tensor(json.loads(capsys.readouterr().out.replace("tensor(", "").replace(")", "")))
    assert probabilities.shape == (1, 2) and abs(float(probabilities.sum()) - 1) < 1e-5


def test_folder_still_loads_in_open_clip_is_pushed_whole_and_card_says_how(exported):
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    assert type(model).__name__ == "CLIP"
    assert set(FILES) <= set(export_files(exported))  # `pretrain push` publishes both formats
    card = (exported / "README.md").read_text()
    assert "CLIPModel.from_pretrained" in card and card.index("open_clip.create") < card.index("CLIPModel")


@pytest.mark.parametrize(
    "change,act", [({"quick_gelu": True}, "quick_gelu"), ({"custom_text": True}, "gelu")]
)
def test_quick_gelu_and_custom_text_tower(tmp_path, change, act):
    """QuickGELU (open_clip's `quick_gelu`) is `hidden_act: quick_gelu`; CustomTextCLIP's tower (`text.`) maps
    as CLIP's does."""
    config = json.loads((ROOT / "configs/models/tiny-clip.json").read_text())
    folder = open_clip_export(tmp_path / "variant", {**config, **change})
    write_transformers(folder)
    hf_config = json.loads((folder / "config.json").read_text())
    assert hf_config["text_config"]["hidden_act"] == hf_config["vision_config"]["hidden_act"] == act
    hf = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a red star", "two blue circles"])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same_direction(
            features(hf.get_image_features(pixel_values=images)), model.eval().encode_image(images)
        )
        assert_same_direction(features(hf.get_text_features(input_ids=tokens)), model.encode_text(tokens))
    assert type(model).__name__ == ("CustomTextCLIP" if "custom_text" in change else "CLIP")


def open_clip_export(folder: Path, model_cfg: dict) -> Path:
    """An open_clip export of `model_cfg` (seeded random weights), written by open_clip and safetensors only."""
    torch.manual_seed(0)
    kind = open_clip.model.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.model.CLIP
    model = kind(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    return write_open_clip_folder(folder, model, model_cfg)


def test_siglip_is_refused_with_one_line(runs, capsys):
    out = runs / "siglip-export"
    argv = ["export", "--checkpoint", str(runs / "siglip"), "--output", str(out), "--format", "transformers"]
    line = refused(argv, capsys, not_made=out)
    assert line.startswith(
        f"pretrain export: error: cannot export {runs / 'siglip'} to transformers' SiglipModel: image tower "
        "is open_clip's VisionTransformer (class token, pre-norm"
    )  # tiny-siglip is open_clip's CLIP ViT with a logit bias; SiglipModel's towers are SigLIP's own
    assert "timm's SigLIP ViT" in line
    assert not (runs / "siglip-export.transformers.tmp").exists()


# (what is changed in tiny-clip's config, words the refusal must contain)
DIFFERENCES = [
    ({"vision_cfg": {"attentional_pool": True}}, "attentional pooling"),
    ({"vision_cfg": {"pool_type": "avg"}}, "image pooling"),
    ({"vision_cfg": {"no_ln_pre": True}}, "no_ln_pre"),
    ({"vision_cfg": {"ls_init_value": 0.1}}, "LayerScale"),
    ({"text_cfg": {"pool_type": "last"}}, "text pooling"),
    ({"text_cfg": {"no_causal_mask": True}}, "causal"),
    ({"text_cfg": {"proj_bias": True}}, "text projection"),
]


@pytest.mark.parametrize("change,words", DIFFERENCES, ids=[w for _, w in DIFFERENCES])
def test_what_transformers_cannot_express_is_named(change, words):
    config = json.loads((ROOT / "configs/models/tiny-clip.json").read_text())
    for tower, values in change.items():
        config[tower] = {**config[tower], **values}
    model = open_clip.model.CLIP(**config)
    tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
    problem = unsupported(model, tokenizer)
    assert problem is not None and words in problem and "\n" not in problem


def test_refusal_writes_nothing(tmp_path):
    config = json.loads((ROOT / "configs/models/tiny-clip.json").read_text())
    folder = open_clip_export(
        tmp_path / "layerscale", {**config, "vision_cfg": {**config["vision_cfg"], "ls_init_value": 0.1}}
    )
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(NotExpressible, match="LayerScale"):
        write_transformers(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    shutil.rmtree(folder)
