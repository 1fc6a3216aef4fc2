"""`pretrain adapt --method linear-probe` against clip_benchmark's own linear probe (same model, images and
protocol: the same accuracy within 0.5 points and the same swept weight decay), and the command's contract:
2 ranks train exactly as 1, a resumed run equals an unbroken one, bad inputs are refused with one line.

clip_benchmark runs in a subprocess with its packages first on PYTHONPATH (tests/requirements-clip-benchmark.
txt, installed once into a cache folder from the package registry), as tests/pretrain/test_caption.py runs
open_clip's `generate`. The model is a briefly trained tiny-clip, exported (clip_benchmark loads it with
open_clip's `local-dir:`); the data the demo's held-out domain with a labelled train split.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, adapt_output_cut_at, command_env, private_packages, torchrun
from safetensors.torch import load_file

from pretrain.adapt.data import LabelledImages, read_labels
from pretrain.adapt.fewshot import sample_shots
from pretrain.adapt.linear_probe import validation_split
from pretrain.adapt.registry import METHODS, MethodSpec
from pretrain.adapt.results import evaluate, harmonic_mean
from pretrain.cli import main

REQUIREMENTS = ROOT / "tests" / "requirements-clip-benchmark.txt"
REFERENCE = Path(__file__).with_name("clip_benchmark_linear_probe.py")
SHOTS = 4  # x 16 classes: one full batch of 64, so batch order cannot tell the two implementations apart


def clip_benchmark_packages() -> Path:
    """The folder holding clip_benchmark and what its linear probe imports; installed on first use."""
    return private_packages(REQUIREMENTS, "clip-benchmark")


@pytest.fixture(scope="module")
def setup(adapt_setup) -> tuple[Path, Path]:
    """(export folder, adaptation set): tests/pretrain/conftest.py's `adapt_setup`."""
    return adapt_setup


def adapt(setup, output: Path, *extra: str) -> int:
    export, data = setup
    args = ["adapt", "--checkpoint", str(export), "--method", "linear-probe", "--train", str(data)]
    return main([*args, "--shots", str(SHOTS), "--output", str(output), *extra])


def row(output: Path) -> dict:
    return json.loads((output / "results.jsonl").read_text().splitlines()[0])


def test_accuracy_and_weight_decay_equal_clip_benchmark(setup, tmp_path):
    """Weight decay 0 (no validation split), then clip_benchmark's sweep on the same validation images."""
    ours = {}
    for search in ("false", "true"):
        assert adapt(setup, tmp_path / search, f"search_weight_decay={search}") == 0
        adapter = json.loads((tmp_path / search / "model" / "adapter.json").read_text())
        ours[search] = {**row(tmp_path / search), "weight_decay": adapter["weight_decay"]}
    pool = read_labels(str(setup[1]), "train")
    shots = sample_shots(pool, SHOTS, [str(i) for i in range(16)], seed=0)
    (tmp_path / "val.json").write_text(json.dumps(list(validation_split(pool, shots, 16, 0).keys)))
    args = [*map(str, setup), str(tmp_path / "false" / "shots.json"), str(tmp_path / "reference"), str(tmp_path / "val.json")]  # fmt: skip
    env = command_env({"PYTHONPATH": f"{clip_benchmark_packages()}:{ROOT}"})
    proc = subprocess.run([sys.executable, str(REFERENCE), *args], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    references = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for mine, reference in zip((ours["false"], ours["true"]), references, strict=True):
        assert abs(mine["top1"] - reference["lp_acc1"]) <= 0.005, (mine, reference)
        assert abs(mine["mean_per_class_recall"] - reference["lp_mean_per_class_recall"]) <= 0.005
        assert mine["weight_decay"] == pytest.approx(reference["weight_decay"])


def test_two_ranks_train_the_same_head_as_one(setup, tmp_path):
    assert adapt(setup, tmp_path / "one", "batch_size=32") == 0
    export, data = setup
    args = ["-m", "pretrain.cli", "adapt", "--checkpoint", str(export), "--method", "linear-probe", "--train",
            str(data), "--shots", str(SHOTS), "--output", str(tmp_path / "two"), "batch_size=32"]  # fmt: skip
    proc = torchrun(2, args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["top1"] == row(tmp_path / "one")["top1"]
    one, two = (load_file(tmp_path / d / "model" / "linear_head.safetensors") for d in ("one", "two"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
    shots = [json.loads((tmp_path / d / "shots.json").read_text()) for d in ("one", "two")]
    assert shots[0] == shots[1]


def test_resumed_run_equals_unbroken_one(setup, tmp_path, caplog):
    """Stopped after the checkpoint of step 10 of 20 (batch 32: 2 steps an epoch), then rerun."""
    assert adapt(setup, tmp_path / "unbroken", "batch_size=32", "checkpoint_every=10") == 0
    cut = adapt_output_cut_at(tmp_path / "unbroken", tmp_path / "cut", 10, 20)
    with caplog.at_level("INFO", logger="pretrain"):
        assert adapt(setup, cut, "batch_size=32", "checkpoint_every=10") == 0
    assert "resumed from" in caplog.text and "step 10" in caplog.text
    resumed, unbroken = (
        load_file(d / "model" / "linear_head.safetensors") for d in (cut, tmp_path / "unbroken")
    )
    for name in unbroken:
        torch.testing.assert_close(resumed[name], unbroken[name], rtol=0, atol=0)


def test_shot_draw_depends_on_the_seed_only(setup):
    pool = read_labels(str(setup[1]), "train")
    names = [str(i) for i in range(16)]
    reversed_pool = pool.subset(list(range(len(pool.keys)))[::-1])
    first, again = sample_shots(pool, 2, names, 5), sample_shots(reversed_pool, 2, names, 5)
    assert sorted(first.keys) == sorted(again.keys) and len(first.keys) == 32
    assert sorted(sample_shots(pool, 2, names, 6).keys) != sorted(first.keys)


def right(key: str) -> bool:
    """The stand-in's rule: right on the samples whose key's character codes sum to an even number."""
    return sum(map(ord, key)) % 2 == 0


class Oracle:
    """A stand-in adapted model that scores each sample by a fixed rule of its own (`right`), whatever else is
    scored with it, as the real methods do."""

    trainable_params = 0

    def logits(self, images: LabelledImages, classnames) -> torch.Tensor:
        logits = torch.zeros(len(images.keys), len(classnames))
        for i, (key, label) in enumerate(zip(images.keys, images.labels)):
            logits[i, label if right(key) else (label + 1) % len(classnames)] = 1
        return logits


def test_base_to_novel_scores_each_half_on_its_own_classes(setup):
    test = read_labels(str(setup[1]), "test")
    result = evaluate(Oracle(), str(setup[1]), base_to_novel=True)
    base = [k for k, label in zip(test.keys, test.labels) if label < 8]  # 16 classes: the first 8 are base
    novel = [k for k, label in zip(test.keys, test.labels) if label >= 8]
    expected_base = sum(map(right, base)) / len(base)
    expected_novel = sum(map(right, novel)) / len(novel)
    assert 0 < expected_base < 1 and 0 < expected_novel < 1
    assert result["base_top1"] == pytest.approx(expected_base)
    assert result["novel_top1"] == pytest.approx(expected_novel)
    assert result["harmonic_mean"] == pytest.approx(
        2 * expected_base * expected_novel / (expected_base + expected_novel)
    )
    assert harmonic_mean(0.5, None) is None


def refusal(setup, tmp_path, case: str) -> list[str]:
    export, data = setup
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    args = {"missing-classes": [], "too-many-shots": ["--shots", "17"], "unknown-key": ["lrr=1"],
            "not-built": [], "no-train-split": []}[case]  # fmt: skip
    if case == "missing-classes":
        (bad / "classnames.txt").unlink()
    if case == "no-train-split":
        shutil.rmtree(bad / "train")
    method = "glad" if case == "not-built" else "linear-probe"
    return ["adapt", "--checkpoint", str(export), "--method", method, "--train", str(bad), "--output",
            str(tmp_path / "out"), *args]  # fmt: skip


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-classes", "classnames.txt"),
        ("too-many-shots", "has only 16 images"),
        ("unknown-key", "unknown config key 'lrr' for method linear-probe (did you mean 'lr'?)"),
        ("not-built", "method 'glad' is not available yet"),
        ("no-train-split", "no train split"),
    ],
)
def test_bad_inputs_are_refused_with_one_line(setup, tmp_path, capsys, monkeypatch, case, message):
    # a registered method without its module yet (every method is built now: stand one in)
    monkeypatch.setitem(METHODS, "glad", MethodSpec("glad", "not built", None, None))
    assert main(refusal(setup, tmp_path, case)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain adapt: error: ") and message in err[0], err
    assert not (tmp_path / "out" / "adapt.json").exists()
