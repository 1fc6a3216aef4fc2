"""`pretrain adapt --method coop|pre`: the contract's JSON lines in a base-to-novel split (a class-specific
context reports null for novel classes), CoOp from "a photo of a" with no training scores exactly open_clip's
zero-shot classifier of "a photo of a {c}." (`build_zero_shot_classifier` on the export loaded by open_clip's
`local-dir:`), 2 ranks train the prompts of 1, a resumed run equals an unbroken one and a finished folder is
re-scored without training, a bad key is one line. The model and data: tests/pretrain/conftest.py's
`adapt_setup` (a briefly trained tiny-clip, 16 classes of the demo's held-out domain)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import adapt_output_cut_at, torchrun
from open_clip import build_zero_shot_classifier
from safetensors.torch import load_file

from pretrain.adapt.data import compute_features, read_labels
from pretrain.adapt.loop import LoopConfig, learning_rate
from pretrain.adapt.prompt_methods import PROMPT_FILE, load_prompt_adapter
from pretrain.cli import main
from webshards.evalset import read_eval_set

SHOTS = 2  # x 16 classes = 32 shots (16 in a base-to-novel split)


def adapt(setup, output: Path, method: str, *extra: str) -> int:
    export, data = setup
    args = [
        "adapt",
        "--checkpoint",
        str(export),
        "--method",
        method,
        "--train",
        str(data),
        "--shots",
        str(SHOTS),
    ]
    return main([*args, "--output", str(output), *extra])


def rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]


def prompt_state(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "model" / PROMPT_FILE)


@pytest.mark.parametrize(
    "method, extra",
    [("coop", []), ("coop", ["class_specific=true"]), ("pre", [])],
    ids=["coop", "coop-class-specific", "pre"],
)
def test_base_to_novel_prints_the_contract(adapt_setup, tmp_path, capsys, method, extra):
    out = tmp_path / "out"
    assert (
        adapt(adapt_setup, out, method, "--split", "base-to-novel", "epochs=2", "batch_size=8", *extra) == 0
    )
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows(out) and len(printed) == 1
    row = printed[0]
    assert row["eval"] == "adapt" and row["method"] == method and row["shots"] == SHOTS
    assert 0 <= row["base_top1"] <= 1 and row["trainable_params"] > 0
    if extra:  # class-specific: no context for the novel classes, nor for all 16 together
        assert row["novel_top1"] is None and row["harmonic_mean"] is None and row["top1"] is None
    else:
        b, n = row["base_top1"], row["novel_top1"]
        assert 0 <= n <= 1 and row["harmonic_mean"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    saved = json.loads((out / "model" / "adapter.json").read_text())
    assert saved["method"] == method and len(saved["classnames"]) == 8


def test_coop_from_a_photo_of_a_without_training_is_the_zero_shot_classifier(adapt_setup, tmp_path):
    export, data = adapt_setup
    out = tmp_path / "out"
    assert adapt(adapt_setup, out, "coop", "epochs=0", "ctx_init=a photo of a") == 0
    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    classnames = list(read_eval_set(str(data)).classnames)
    test = read_labels(str(data), "test")
    with torch.no_grad():
        classifier = build_zero_shot_classifier(
            model, tokenizer, classnames, ["a photo of a {}."], device="cpu"
        )
        features = compute_features(model, test, preprocess, torch.device("cpu"))
        reference = model.logit_scale.exp() * features @ classifier
    top1 = (reference.argmax(1) == torch.tensor(test.labels)).double().mean().item()
    assert rows(out)[0]["top1"] == top1
    adapter = load_prompt_adapter(
        out / "model", open_clip_bundle(model, tokenizer, preprocess), lambda _: features
    )
    torch.testing.assert_close(adapter.logits(test, classnames), reference, atol=1e-5, rtol=0)


def other_set(data: Path, folder: Path) -> Path:
    """Another eval set with other class names (cross-dataset): 3 classes of 4 images each, taken from the
    adaptation set's test split and filed under new names, written by `data-tools eval-set`."""
    from data_tools.cli import main as data_tools
    from webshards.evalset import shard_urls
    from webshards.layout import iter_shard

    names, taken = ["lemon", "tree frog", "teapot"], {}
    for url in shard_urls(str(data)):
        for sample in iter_shard(url, decode=False):
            label = int(sample["cls"]) % len(names)
            if taken.get(label, 0) < 4:
                (folder / "images" / names[label]).mkdir(parents=True, exist_ok=True)
                (folder / "images" / names[label] / f"{sample['__key__']}.jpg").write_bytes(sample["jpg"])
                taken[label] = taken.get(label, 0) + 1
    assert data_tools(["eval-set", "--input", str(folder / "images"), "--output", str(folder / "set")]) == 0
    return folder / "set"


def test_cross_dataset_scores_the_other_sets_classes(adapt_setup, tmp_path):
    """Adapted on one set, scored on another with other class names: CoOp from "a photo of a" without
    training gives there the zero-shot classifier of that set's names (open_clip's, computed here); the
    linear probe, whose head knows only its own classes, reports null."""
    export, data = adapt_setup
    other = other_set(data, tmp_path)
    assert (
        adapt(
            adapt_setup, tmp_path / "coop", "coop", "epochs=0", "ctx_init=a photo of a", "--eval", str(other)
        )
        == 0
    )
    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    test = read_labels(str(other), "test")
    with torch.no_grad():
        classnames = list(read_eval_set(str(other)).classnames)
        classifier = build_zero_shot_classifier(
            model, tokenizer, classnames, ["a photo of a {}."], device="cpu"
        )
        logits = compute_features(model, test, preprocess, torch.device("cpu")) @ classifier
    top1 = (logits.argmax(1) == torch.tensor(test.labels)).double().mean().item()
    row = rows(tmp_path / "coop")[0]
    assert row["eval"] == "set" and row["top1"] == top1 and row["samples"] == 12
    assert adapt(adapt_setup, tmp_path / "probe", "linear-probe", "--eval", str(other)) == 0
    assert rows(tmp_path / "probe")[0]["top1"] is None


def open_clip_bundle(model, tokenizer, preprocess):
    """What `load_prompt_adapter` reads of a bundle: the model and its tokenizer."""
    return type("Bundle", (), {"model": model, "tokenizer": tokenizer, "preprocess_val": preprocess})()


def test_two_ranks_train_the_prompts_of_one(adapt_setup, tmp_path):
    settings = ["epochs=2", "batch_size=8", "warmup_epochs=0", "lr=0.05"]  # 4 steps that move the prompts
    assert adapt(adapt_setup, tmp_path / "one", "pre", *settings) == 0
    export, data = adapt_setup
    args = ["-m", "pretrain.cli", "adapt", "--checkpoint", str(export), "--method", "pre", "--train", str(data),
            "--shots", str(SHOTS), "--output", str(tmp_path / "two"), *settings]  # fmt: skip
    proc = torchrun(2, args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = prompt_state(tmp_path / "one"), prompt_state(tmp_path / "two")
    assert set(one) == set(two) and {"ctx", "encoder.lstm.weight_ih_l0"} <= set(one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)


def test_resumed_run_equals_unbroken_one_and_a_finished_one_is_rescored(adapt_setup, tmp_path, caplog):
    """Stopped after the checkpoint of step 2 of 4 (32 shots in batches of 16: 2 steps an epoch, the first at
    the constant warm-up rate), then rerun; the finished folder rerun with an --eval scores without training."""
    settings = ["epochs=2", "batch_size=16", "checkpoint_every=2", "lr=0.05"]
    assert adapt(adapt_setup, tmp_path / "unbroken", "coop", *settings) == 0
    cut = adapt_output_cut_at(tmp_path / "unbroken", tmp_path / "cut", 2, 4)
    with caplog.at_level("INFO", logger="pretrain"):
        assert adapt(adapt_setup, cut, "coop", *settings) == 0
    assert "resumed from" in caplog.text and "(step 2)" in caplog.text
    unbroken = prompt_state(tmp_path / "unbroken")
    torch.testing.assert_close(prompt_state(cut)["ctx"], unbroken["ctx"], rtol=0, atol=0)
    caplog.clear()
    with caplog.at_level("INFO", logger="pretrain"):
        assert adapt(adapt_setup, cut, "coop", *settings, "--eval", str(adapt_setup[1])) == 0
    assert "(step 4)" in caplog.text and rows(cut)[0]["top1"] == rows(tmp_path / "unbroken")[0]["top1"]
    torch.testing.assert_close(prompt_state(cut)["ctx"], unbroken["ctx"], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["coop", "pre"])
def test_a_bad_key_is_one_line(adapt_setup, tmp_path, capsys, method):
    assert adapt(adapt_setup, tmp_path / "out", method, "n_ctxx=4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = (
        f"pretrain adapt: error: unknown config key 'n_ctxx' for method {method} (did you mean 'n_ctx'?)"
    )
    assert err == [expected]
    assert not (tmp_path / "out" / "adapt.json").exists()


def test_the_loop_holds_the_papers_constant_warm_up():
    """CoOp's and PRE's first epoch at a constant 1e-5, then cosine from lr to 0 over the remaining steps."""
    cfg = LoopConfig(steps=10, lr=0.002, warmup=2, warmup_lr=1e-5)
    assert [learning_rate(cfg, s) for s in (0, 1)] == [1e-5, 1e-5]
    assert learning_rate(cfg, 2) == 0.002 and learning_rate(cfg, 6) == pytest.approx(0.001)
    assert learning_rate(LoopConfig(steps=10, lr=0.002, warmup=2), 0) == 0.001  # linear without warmup_lr
