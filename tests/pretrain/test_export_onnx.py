"""`pretrain export --format onnx`: onnxruntime's embeddings are the model's, for any batch size.

The reference is the project's own model loaded from the checkpoint (`encode_image` / `encode_text`),
run by torch; the graphs are run by onnxruntime, checked by `onnx.checker`, and their opset and dynamic
batch dimension read from the ONNX protobuf.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import open_clip
import pytest
import torch
from helpers import ROOT, cli_output, one_torch_thread, process_state_kept, refused, train_in_process
from PIL import Image, ImageDraw

from pretrain.cli import main
from pretrain.models.build import load_trained
from pretrain.publish import onnx_export

MODELS = ["tiny-clip", "tiny-siglip", pytest.param("tiny-coca", marks=pytest.mark.slow)]
every_model = pytest.mark.parametrize("exported", MODELS, indirect=True)
tiny_clip = pytest.mark.parametrize("exported", ["tiny-clip"], indirect=True)  # the same export, reused


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(model name, run dir, `--format onnx` export) of a 1-step run of each tiny model."""
    name = request.param
    root = tmp_path_factory.mktemp(f"onnx-{name}")
    out = root / "export"
    with one_torch_thread(), process_state_kept():
        run = train_in_process(root, ["train.steps=1", "checkpoint.every=1", f"model.name={name}"], name="r")
        assert main(["export", "--checkpoint", str(run), "--output", str(out), "--format", "onnx"]) == 0
    return name, run, out


def ort_run(path: Path, name: str, inputs: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: inputs.numpy()})[0]


@every_model
def test_onnx_towers_give_the_models_embeddings(exported):
    name, run, out = exported
    assert {"image_encoder.onnx", "text_encoder.onnx", "onnx_config.json", "open_clip_config.json"} <= {
        p.name for p in out.iterdir()
    }
    ours = load_trained(run)
    model = ours.model.eval()
    captions = ["a red circle", "a blue square on a white background", "a photo", "two green stars", "x"]
    for tower, (file, input_name) in {
        "image": ("image_encoder.onnx", "pixel_values"),
        "text": ("text_encoder.onnx", "input_ids"),
    }.items():
        graph = onnx.load(str(out / file))
        onnx.checker.check_model(graph, full_check=True)
        assert {o.domain: o.version for o in graph.opset_import}[""] == onnx_export.OPSET
        batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # symbolic: any batch size
        for batch in (1, 5):
            if tower == "image":
                inputs = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
                with torch.no_grad():
                    expected = model.encode_image(inputs).numpy()
            else:
                inputs = ours.tokenizer(captions[:batch])
                with torch.no_grad():
                    expected = model.encode_text(inputs).numpy()
            got = ort_run(out / file, input_name, inputs)
            assert got.shape == expected.shape == (batch, 128), (name, tower, got.shape)
            assert np.abs(got - expected).max() <= 1e-4, (name, tower, batch, np.abs(got - expected).max())


@every_model
def test_onnx_config_and_model_card_say_how_to_use_it(exported):
    name, run, out = exported
    config = json.loads((out / "onnx_config.json").read_text())
    open_clip_cfg = json.loads((out / "open_clip_config.json").read_text())
    model = load_trained(run).model
    assert config["preprocess_cfg"] == open_clip_cfg["preprocess_cfg"] and config["image_size"] == [64, 64]
    assert config["tokenizer"]["context_length"] == open_clip_cfg["model_cfg"]["text_cfg"]["context_length"]
    assert config["normalized"] is False and config["opset"] == onnx_export.OPSET
    assert config["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
    assert (config["logit_bias"] is not None) == (name == "tiny-siglip")
    card = (out / "README.md").read_text()
    assert card.index("## Use\n") < card.index("## Use with ONNX Runtime") < card.index("## Training\n")
    assert 'ort.InferenceSession("PATH_TO_THIS_FOLDER/image_encoder.onnx")' in card


@tiny_clip
def test_docs_inference_example_runs_as_written(exported, tmp_path):
    """The onnxruntime block of docs/export.md, its folder and image paths pointed at this export, gives
    the cosines open_clip's own transform, tokenizer and model give."""
    name, run, out = exported
    block = re.search(r"## ONNX\n.*?```python\n(.*?)```", (ROOT / "docs/export.md").read_text(), re.S)[1]
    assert len(block.strip().splitlines()) <= 14
    photo = tmp_path / "photo.png"
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill="red")
    image.save(photo)
    code = block.replace("runs/demo/export", str(out)).replace("photo.jpg", str(photo))
    scope: dict = {}
    exec(compile(code, "docs/export.md", "exec"), scope)  # noqa: S102 - the docs' own example
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    with torch.no_grad():
        image_emb = reference.eval().encode_image(preprocess(Image.open(photo))[None], normalize=True)
        text_emb = reference.encode_text(tokenizer(["a red circle", "a blue square"]), normalize=True)
    expected = (image_emb @ text_emb.T).numpy()
    got = scope["unit"](scope["image_embeds"]) @ scope["unit"](scope["text_embeds"]).T
    np.testing.assert_allclose(got, expected, atol=1e-4)


@tiny_clip
def test_push_publishes_the_onnx_files(exported, tmp_path, capsys):
    name, _, out = exported
    cli_output(["push", "--export", str(out), "--to", str(tmp_path / "store")], capsys)
    pushed = {p.name for p in (tmp_path / "store").iterdir()}
    assert {"image_encoder.onnx", "text_encoder.onnx", "onnx_config.json", "_COMPLETE"} <= pushed


@tiny_clip
def test_a_tower_that_cannot_be_exported_is_refused_in_one_line(exported, tmp_path, capsys, monkeypatch):
    """A tower whose forward branches on its input's values cannot be traced: one line naming it, exit 2,
    no output folder."""
    name, run, _ = exported

    def branching(self, pixel_values):
        if pixel_values.mean() > 0:  # data-dependent control flow: torch.export cannot trace it
            pixel_values = -pixel_values
        return self.model.encode_image(pixel_values)

    monkeypatch.setattr(onnx_export.ImageEncoder, "forward", branching)
    out = tmp_path / "export"
    argv = ["export", "--checkpoint", str(run), "--output", str(out), "--format", "onnx"]
    line = refused(argv, capsys, not_made=out)
    assert "cannot export the image tower to ONNX" in line
    assert not out.with_name("export.onnx.tmp").exists()


def test_missing_exporter_packages_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(onnx_export, "NEEDED", ("onnx", "no_such_onnx_package"))
    argv = [
        "export",
        "--checkpoint",
        str(tmp_path / "r"),
        "--output",
        str(tmp_path / "o"),
        "--format",
        "onnx",
    ]
    line = refused(argv, capsys, not_made=tmp_path / "o")
    assert "--format onnx needs no_such_onnx_package" in line and "clip-pretrain[export]" in line
