"""`make demo`'s program end to end: fresh data, train tiny-clip on CPU, zero-shot >= 0.90, export, timings.

This is the README's first command (minus venv set-up), so it runs in `make test`: about 4 minutes on
2 cores.
"""

from __future__ import annotations

import re
import sys

import pytest
from helpers import ROOT, run_cmd


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the subprocess's own limit below; pytest's default (600 s) would cut it first
def test_demo_reaches_target_and_prints_its_time(tmp_path):
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "pretrain.demo",
            "--data",
            str(tmp_path / "data"),
            f"run.dir={tmp_path / 'runs'}",
        ],
        timeout=1800,  # ~4 minutes alone on 2 cores; generous for a loaded machine
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    top1 = float(re.search(r"zero-shot top-1\s+([0-9.]+)", proc.stdout).group(1))
    assert top1 >= 0.90
    assert re.search(r"time: total\s+[0-9.]+ s", proc.stdout)
    assert (tmp_path / "runs/demo/export/open_clip_model.safetensors").is_file()
    curves = tmp_path / "runs/demo/curves.png"
    assert re.search(rf"curves\s+{re.escape(str(curves))}\n", proc.stdout)
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from pretrain.plot import plot_run

    _, titles = plot_run(tmp_path / "runs/demo", tmp_path / "again.png")
    assert titles[:4] == ["loss", "lr", "samples/s", "data wait"]
    assert "eval zeroshot: topk" in titles  # top1 and top5 of the demo's zero-shot eval


def test_demo_stopped_by_a_signal_says_so_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    import pretrain.demo as demo

    class StoppedTrainer:  # what a SIGTERM leaves: train() returns early, without the final evaluation
        preempted = True

        def __init__(self, cfg) -> None:
            pass

        def train(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(demo, "Trainer", StoppedTrainer)
    monkeypatch.setattr(demo, "write_demo_data", lambda folder: None)
    (tmp_path / "demo.json").write_text('{"train": "train/{00000..00001}.tar"}')
    assert demo.main(["--data", str(tmp_path), f"run.dir={tmp_path}"]) == 1
    assert "stopped by a signal before the final evaluation" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("caption", "classname", "names"),
    [
        ("a photo of a red circle", "red circle", True),
        ("the circle is red", "red circle", True),  # word order does not matter
        ("A large RED Circle.", "red circle", True),
        ("a blue circle", "red circle", False),  # wrong colour
        ("a red square", "red circle", False),  # wrong shape
        ("a red circles", "red circle", False),  # whole words only
        ("a reddish circle", "red circle", False),
        ("a star coloured purple", "purple star", True),
        ("a starfish coloured purple", "purple star", False),
        ("", "red circle", False),
    ],
)
def test_a_caption_counts_when_it_names_colour_and_shape(caption, classname, names):
    from pretrain.evaluation.caption import names_class

    assert names_class(caption, classname) is names


def test_caption_score_is_the_share_of_captions_naming_their_image_class():
    from pretrain.evaluation.caption import caption_score

    classnames = ["red circle", "blue star", "green square", "white triangle"]
    captions = ["a photo of a red circle", "a blue star", "a green square", "a white circle"]
    # right, right, names class 2 but the image is class 1, right colour wrong shape: 2 of 4
    assert caption_score(captions, [0, 1, 1, 3], classnames) == 0.5
    with pytest.raises(ValueError, match="one label per caption"):
        caption_score(captions, [0, 1], classnames)


def test_coca_demo_reports_zero_shot_and_caption_score(tmp_path, monkeypatch, capsys):
    """The CoCa path end to end on a few images and 1 step: both result rows, and the caption score is the
    share of the printed example captions (all 3 eval images) that name their class."""
    import pretrain.demo as demo
    from data_tools.demo import write_demo_data

    def small_data(folder):
        return write_demo_data(folder, samples=32, eval_samples=3, samples_per_shard=32, workers=1)

    monkeypatch.setattr(demo, "write_demo_data", small_data)
    overrides = ["train.steps=1", "train.batch_size=4", "log.every=1", f"run.dir={tmp_path / 'runs'}"]
    demo.main(
        ["--data", str(tmp_path / "data"), "--config", str(ROOT / "configs/coca-demo.yaml"), *overrides]
    )
    out = capsys.readouterr().out
    assert re.search(r"zero-shot top-1\s+[0-9.]+  \(target >= 0\.\d\d: (PASS|FAIL)\)", out)
    score = re.search(r"caption names colour \+ shape\s+([0-9.]+)  \(target >= 0\.80: (PASS|FAIL)\)", out)
    examples = re.findall(r'caption of a (\w+) (\w+)\s+"(.*)"', out)
    shown = sorted(f"{colour} {shape}" for colour, shape, _ in examples)
    assert shown == ["red circle", "red square", "red triangle"]  # classes 0-2, in shard (shuffled) order
    words = [re.findall(r"[a-z]+", text.lower()) for _, _, text in examples]
    named = [colour in w and shape in w for (colour, shape, _), w in zip(examples, words, strict=True)]
    assert float(score.group(1)) == pytest.approx(sum(named) / 3, abs=1e-3)
