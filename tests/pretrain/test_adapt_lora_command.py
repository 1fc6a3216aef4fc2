"""`pretrain adapt --method lora|glad` end to end on the demo adaptation set (base-to-novel): the contract's JSON
line; zero steps score exactly open_clip's zero-shot classifier of the unadapted model; 2 ranks train the same
adapters as 1 (GLAD too: its g and g_sam are the global batch's); a resumed run equals an unbroken one; the saved merged model gives the
adapted model's outputs through open_clip's `local-dir:` and the command's top-1 through `pretrain eval`.

Few steps at a raised learning rate on 2 shots of the 8 base classes: enough to move the adapters well away
from zero, cheap enough for the suite (tests/pretrain/conftest.py's `adapt_setup` is the trained tiny-clip)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import adapt_output_cut_at, torchrun
from safetensors.torch import load_file

from pretrain.adapt.data import load_pixels, read_labels
from pretrain.adapt.lora import LoRAConfig, apply_lora
from pretrain.cli import main
from webshards.evalset import TEMPLATES_FILE

SHOTS = 2
TEMPLATE = "a photo of a {c}."
TRAIN = ["steps=4", "lr=0.002", "batch_size=16", "checkpoint_every=2"]  # 16 shots: one batch a step
CONTRACT = {"eval", "method", "shots", "top1", "base_top1", "novel_top1", "harmonic_mean"}


def command(setup, output: Path, method: str = "lora", *overrides: str) -> list[str]:
    export, data = setup
    return ["adapt", "--checkpoint", str(export), "--method", method, "--train", str(data), "--shots",
            str(SHOTS), "--split", "base-to-novel", "--output", str(output), *overrides]  # fmt: skip


def adapt(setup, output: Path, capsys, method: str = "lora", *overrides: str) -> dict:
    """Run the command in process; its one stdout line, checked against the contract."""
    capsys.readouterr()
    assert main(command(setup, output, method, *overrides)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    row = json.loads(lines[0])
    assert set(row) >= CONTRACT and row["method"] == method and row["shots"] == SHOTS, row
    return row


def trained(setup, tmp_path_factory, method: str) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp(method) / "run"
    assert main(command(setup, output, method, *TRAIN)) == 0
    return output, json.loads((output / "results.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def lora_run(adapt_setup, tmp_path_factory) -> tuple[Path, dict]:
    """One trained LoRA run (its folder and printed row), shared by the tests that read its outputs."""
    return trained(adapt_setup, tmp_path_factory, "lora")


@pytest.fixture(scope="module")
def glad_run(adapt_setup, tmp_path_factory) -> tuple[Path, dict]:
    """One trained GLAD run on one process, the reference of its 2-rank and resumed runs."""
    return trained(adapt_setup, tmp_path_factory, "glad")


@torch.no_grad()
def zero_shot_top1(export: Path, data: Path) -> dict:
    """top-1 on the test split (all, base, novel classes) of open_clip's `build_zero_shot_classifier` over the
    template, with the unadapted model loaded by open_clip itself."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    names = (data / "classnames.txt").read_text().splitlines()
    test = read_labels(str(data), "test")
    features = model.encode_image(load_pixels(test, preprocess), normalize=True)
    labels = torch.tensor(test.labels)
    result = {}
    for part, classes in (("top1", range(16)), ("base_top1", range(8)), ("novel_top1", range(8, 16))):
        classes = list(classes)
        keep = torch.isin(labels, torch.tensor(classes))
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer, [names[c] for c in classes], [lambda c: TEMPLATE.format(c=c)]
        )
        predicted = torch.tensor(classes)[(features[keep] @ classifier).argmax(1)]
        result[part] = (predicted == labels[keep]).double().mean().item()
    return result


def test_zero_steps_score_the_unadapted_zero_shot_classifier(adapt_setup, tmp_path, capsys):
    row = adapt(adapt_setup, tmp_path / "zero", capsys, "lora", "steps=0")
    reference = zero_shot_top1(*adapt_setup)
    for key, value in reference.items():
        assert row[key] == pytest.approx(value, abs=1e-9), (key, row, reference)


def test_lora_trains_and_reports_the_contract(lora_run, adapt_setup):
    output, row = lora_run
    assert set(row) >= CONTRACT and row["trainable_params"] == 3 * 2 * (128 + 128) * 4
    adapter = load_file(output / "model" / "adapter.safetensors")
    assert adapter and max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-3
    assert row != zero_shot_top1(*adapt_setup)  # it trained (B moved) and still scores every class


def test_merged_export_loads_in_open_clip_and_pretrain_eval(lora_run, adapt_setup, tmp_path, capsys):
    """open_clip's `local-dir:` gives the adapted (unmerged) model's outputs; `pretrain eval` on the test split
    with the training template gives the top-1 the command printed."""
    output, row = lora_run
    export, data = adapt_setup
    base = open_clip.create_model(f"local-dir:{export}")
    apply_lora(base, LoRAConfig())
    missing = base.load_state_dict(load_file(output / "model" / "adapter.safetensors"), strict=False)
    assert not missing.unexpected_keys
    merged = open_clip.create_model(f"local-dir:{output / 'model'}")
    base.eval(), merged.eval()
    images, tokens = (
        torch.randn(4, 3, 64, 64),
        open_clip.get_tokenizer(f"local-dir:{export}")(["a red circle."]),
    )
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(images), base.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(merged.encode_text(tokens), base.encode_text(tokens), rtol=0, atol=1e-5)
    one_template = tmp_path / "adapt"
    shutil.copytree(data, one_template, ignore=shutil.ignore_patterns("train"))
    (one_template / TEMPLATES_FILE).write_text(TEMPLATE + "\n")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(output / "model"), "--task", f"adapt={one_template}"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["top1"] == pytest.approx(row["top1"], abs=1e-9), (evaluated, row)


@pytest.mark.parametrize("method", ["lora", "glad"])
def test_resumed_run_equals_unbroken_one(request, adapt_setup, tmp_path, capsys, caplog, method):
    """The module's run (4 steps) as if stopped after the checkpoint of step 2, then rerun."""
    unbroken, row = request.getfixturevalue(f"{method}_run")
    cut = tmp_path / "cut"
    adapt_output_cut_at(unbroken, cut, 2, 4)
    with caplog.at_level("INFO", logger="pretrain"):
        resumed = adapt(adapt_setup, cut, capsys, method, *TRAIN)
    assert "resumed from" in caplog.text and "step 2" in caplog.text
    assert resumed["top1"] == row["top1"]
    one, two = (load_file(d / "model" / "adapter.safetensors") for d in (unbroken, cut))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "glad"])
def test_two_ranks_train_as_one(request, adapt_setup, tmp_path, method):
    """Within 1e-5 of one rank on the same global batch: LoRA (dropout on: every rank must drop the same
    columns) and GLAD (its extra forwards and double backward outside DDP's forward, its g and g_sam averaged
    over ranks, its ascent step the global one)."""
    args = ["-m", "pretrain.cli", *command(adapt_setup, tmp_path / "two", method, *TRAIN)]
    proc = torchrun(2, args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(row) >= CONTRACT and row["method"] == method
    two = load_file(tmp_path / "two" / "model" / "adapter.safetensors")
    one = load_file(request.getfixturevalue(f"{method}_run")[0] / "model" / "adapter.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
    assert max(v.abs().max().item() for k, v in two.items() if "lora_B" in k) > 1e-3


def test_text_tower_only_trains_on_cached_image_features(adapt_setup, tmp_path, capsys):
    adapt(adapt_setup, tmp_path / "text", capsys, "lora", "towers=text", *TRAIN)
    adapter = load_file(tmp_path / "text" / "model" / "adapter.safetensors")
    assert adapter and not any(k.startswith("visual.") for k in adapter)
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-3
    assert list((tmp_path / "text" / "features").glob("*.pt"))  # the shots' and the test split's


@pytest.mark.parametrize(
    "override, message",
    [("towers=top", "lora.towers: 'top'"), ("rank=0", "lora.rank"), ("template=a photo", "template: must"),
     ("layers=[a]", "layers: block indices")],
)  # fmt: skip
def test_bad_lora_settings_are_refused_with_one_line(adapt_setup, tmp_path, capsys, override, message):
    assert main(command(adapt_setup, tmp_path / "out", "glad", override)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
