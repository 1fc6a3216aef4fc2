"""`pretrain export --format transformers` of open_clip's SigLIP architecture (a timm SigLIP ViT with its MAP
head, a text tower attending both ways pooled at the last position, a logit bias), against the real
transformers package: `SiglipModel` and `AutoProcessor` load the folder and give our model's image and text
embeddings and logits for the 64 held-out demo images and captions. No SigLIP ViT of timm is small, so the test
registers one with timm's own constructor and the settings of timm's SigLIP ViTs (no class token, MAP pooling,
tanh GELU, eps 1e-6)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import (
    ROOT,
    assert_same_direction,
    features,
    one_torch_thread,
    train_in_process,
    write_open_clip_folder,
)
from PIL import Image
from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer

from pretrain.cli import main
from pretrain.models.build import load_trained
from pretrain.publish.hf_export import write_transformers
from pretrain.publish.hf_siglip import siglip_config, siglip_state_dict, unsupported

transformers = pytest.importorskip("transformers")
TIMM_NAME = "vit_test_patch16_siglip_64"
LONG = " ".join(["a small red circle next to a large blue square"] * 6)  # past the 32-token context


@register_model
def vit_test_patch16_siglip_64(pretrained: bool = False, **kwargs):
    """vit_base_patch32_siglip_256's settings at 64 px, width 64, 2 blocks (timm's own builder)."""
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, class_token=False,
                global_pool="map", act_layer="gelu_tanh")  # fmt: skip
    return _create_vision_transformer(TIMM_NAME, pretrained=pretrained, **dict(args, **kwargs))


# ViT-B-16-SigLIP.json's settings at test size, with open_clip's own BPE tokenizer (SigLIP's is a download)
SIGLIP_CFG = {
    "embed_dim": 64,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 64, "timm_model_name": TIMM_NAME, "timm_model_pretrained": False,
                   "timm_pool": "map", "timm_proj": "none"},  # fmt: skip
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
}  # fmt: skip


@pytest.fixture(scope="module")
def siglip_run(demo_data, tmp_path_factory) -> Path:
    """A 2-step run of the small SigLIP (its config a JSON file, as `model.name` takes it)."""
    root = tmp_path_factory.mktemp("hf-siglip")
    (root / "small-siglip.json").write_text(json.dumps(SIGLIP_CFG))
    overrides = [f"data.train={demo_data}/train/{{00000..00003}}.tar", "train.batch_size=16", "train.steps=2",
                 f"model.name={root / 'small-siglip.json'}"]  # fmt: skip
    with one_torch_thread():
        return train_in_process(root, overrides, name="siglip")


@pytest.fixture(scope="module")
def siglip_export(siglip_run) -> Path:
    out = siglip_run.parent / "export"
    argv = ["export", "--checkpoint", str(siglip_run), "--output", str(out), "--format", "transformers"]
    assert main(argv) == 0
    return out


def test_siglip_model_and_processor_give_our_embeddings(siglip_export, siglip_run, held_out):
    images, captions = held_out
    hf, info = transformers.SiglipModel.from_pretrained(str(siglip_export), output_loading_info=True)
    assert not any(info.values()), info  # every weight read, none left over or made up
    processor = transformers.AutoProcessor.from_pretrained(str(siglip_export))
    assert type(processor).__name__ == "SiglipProcessor"
    ours = load_trained(siglip_run)  # the checkpoint itself, not the export
    hf.eval(), ours.model.eval()
    texts = [*captions, LONG]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding="max_length", truncation=True)
    assert set(inputs) == {"input_ids", "pixel_values"}  # no attention mask: open_clip's tower takes none
    tokens = ours.tokenizer(texts)
    assert torch.equal(inputs["input_ids"], tokens)  # padded with 0 to the context length, as open_clip pads
    with torch.no_grad():
        out = hf(**inputs)
        pixels = torch.stack([ours.preprocess_val(image) for image in images])
        image_ours = ours.model.encode_image(pixels, normalize=True)
        text_ours = ours.model.encode_text(tokens, normalize=True)
        assert_same_direction(features(hf.get_text_features(input_ids=tokens)), text_ours)
    assert_same_direction(out.image_embeds, image_ours)
    assert_same_direction(out.text_embeds, text_ours)
    model = ours.model
    expected = model.logit_scale.exp() * image_ours @ text_ours.T + model.logit_bias
    torch.testing.assert_close(out.logits_per_image, expected, rtol=1e-4, atol=1e-4)


def test_docs_lines_run_as_written(siglip_export, capsys):
    section = (ROOT / "docs/export.md").read_text().split("### SigLIP models as `SiglipModel`\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0].replace("runs/siglip/hf", str(siglip_export))
    exec(compile(code, "docs/export.md", "exec"), {})
    printed = capsys.readouterr().out.replace("tensor(", "").replace(")", "")
    probabilities = torch.tensor(json.loads(printed))
    assert probabilities.shape == (1, 2) and ((probabilities > 0) & (probabilities < 1)).all()


def test_auto_classes_and_card(siglip_export):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(siglip_export))
    assert type(tokenizer).__name__ == "CLIPTokenizer" and tokenizer.model_max_length == 32
    model = transformers.AutoModel.from_pretrained(str(siglip_export))
    assert type(model).__name__ == "SiglipModel"
    card = (siglip_export / "README.md").read_text()
    assert "SiglipModel.from_pretrained" in card and card.index("open_clip.create") < card.index(
        "SiglipModel"
    )
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{siglip_export}")
    assert type(loaded).__name__ == "CustomTextCLIP"


def test_squash_preprocessing_is_siglip_image_processor(tmp_path):
    """open_clip's `squash` resize is SiglipImageProcessor's only resize: same pixels as open_clip's transform
    (bicubic, mean/std 0.5) for images of the model's size."""
    torch.manual_seed(0)
    model = open_clip.model.CustomTextCLIP(**{k: v for k, v in SIGLIP_CFG.items() if k != "custom_text"})
    folder = write_open_clip_folder(tmp_path / "squash", model, SIGLIP_CFG)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"].update(mean=[0.5] * 3, std=[0.5] * 3, resize_mode="squash")
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    write_transformers(folder)
    processor = transformers.AutoProcessor.from_pretrained(str(folder))
    assert type(processor.image_processor).__name__.startswith("SiglipImageProcessor")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    image = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy()
    pil = Image.fromarray(image)
    theirs = processor(images=pil, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(theirs, preprocess(pil), rtol=0, atol=1e-5)


# (what is changed in the small SigLIP's config, words the refusal must contain)
DIFFERENCES = [
    ({"vision_cfg": {"timm_proj": "linear"}}, "timm_proj"),
    ({"vision_cfg": {"timm_pool": "avg"}}, "image pooling"),
    ({"text_cfg": {"no_causal_mask": False}}, "causal"),
    ({"text_cfg": {"pool_type": "argmax"}}, "text pooling"),
    ({"text_cfg": {"ls_init_value": 0.1}}, "LayerScale"),
]


@pytest.mark.parametrize("change,words", DIFFERENCES, ids=[w for _, w in DIFFERENCES])
def test_what_siglip_model_cannot_express_is_named(change, words):
    config = {k: v for k, v in SIGLIP_CFG.items() if k != "custom_text"}
    for tower, values in change.items():
        config[tower] = {**config[tower], **values}
    model = open_clip.model.CustomTextCLIP(**config)
    problem = unsupported(model, open_clip.SimpleTokenizer(context_length=32))
    assert problem is not None and words in problem and "\n" not in problem


def small_hf_tokenizer(folder: Path, captions: list[str]) -> Path:
    """A T5-like Hugging Face tokenizer (pad 0, end-of-text appended) of the captions' words, made with the
    tokenizers library: what open_clip's SigLIP configs name in `hf_tokenizer_name`, without the download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("clean", ["canonicalize", "whitespace"])
def test_hugging_face_tokenizer_is_exported_as_open_clip_uses_it(tmp_path, held_out, clean):
    """A SigLIP text tower with a Hugging Face tokenizer (open_clip's HFTokenizer, cleaning the text first as
    `tokenizer_kwargs.clean` says; SigLIP's configs: canonicalize): the folder's tokenizer, as AutoProcessor
    loads it, gives the ids open_clip's tokenizer gave in training (padded to the context length, no attention
    mask), also for text with capitals, punctuation and extra spaces, and so SiglipModel gives open_clip's text
    embeddings."""
    captions = held_out[1]
    tokenizer = small_hf_tokenizer(tmp_path / "tokenizer", [c.replace("-", " ") for c in captions])
    text_cfg = {
        **SIGLIP_CFG["text_cfg"],
        "hf_tokenizer_name": str(tokenizer),
        "tokenizer_kwargs": {"clean": clean},
    }
    text_cfg["vocab_size"] = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    config = {**SIGLIP_CFG, "text_cfg": text_cfg}
    torch.manual_seed(0)
    model = open_clip.model.CustomTextCLIP(**{k: v for k, v in config.items() if k != "custom_text"})
    folder = write_open_clip_folder(tmp_path / "export", model, config)
    trained_with = open_clip.tokenizer.HFTokenizer(str(tokenizer), context_length=32, clean=clean)
    trained_with.save_pretrained(str(folder))  # as our export saves it
    write_transformers(folder)
    hf = transformers.SiglipModel.from_pretrained(str(folder)).eval()
    processor = transformers.AutoProcessor.from_pretrained(str(folder))
    ours, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    texts = [
        *captions,
        LONG,
        "  A Medium-Sized RED circle!  ",
        'the_square is "orange"; (a plain background)',
    ]
    ids = trained_with(texts)
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{folder}")(texts), ids)  # open_clip reads it alike
    inputs = processor(text=texts, return_tensors="pt", padding="max_length", truncation=True)
    assert set(inputs) == {"input_ids"} and torch.equal(inputs["input_ids"], ids)
    with torch.no_grad():
        assert_same_direction(features(hf.get_text_features(**inputs)), ours.eval().encode_text(ids))


@pytest.mark.slow
def test_open_clip_siglip_architecture_maps_whole(tmp_path):
    """open_clip's own ViT-B-16-SigLIP (random init; ~200M parameters, so slow): nothing refused, every weight
    placed in transformers' SiglipModel, the same image and text embeddings."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-SigLIP").eval()
    tokenizer = small_hf_tokenizer(tmp_path / "tokenizer", ["a red star"])  # its T5 tokenizer is a download
    hf_tokenizer = open_clip.tokenizer.HFTokenizer(str(tokenizer), context_length=64)
    assert unsupported(model, hf_tokenizer) is None
    config = siglip_config(model, hf_tokenizer)
    hf = transformers.SiglipModel(transformers.SiglipConfig(**config)).eval()
    hf.load_state_dict(siglip_state_dict(model), strict=True)
    images, ids = torch.randn(2, 3, 224, 224), torch.randint(0, 32000, (2, 64))
    with torch.no_grad():
        assert_same_direction(
            features(hf.get_image_features(pixel_values=images)), model.encode_image(images)
        )
        assert_same_direction(features(hf.get_text_features(input_ids=ids)), model.encode_text(ids))
