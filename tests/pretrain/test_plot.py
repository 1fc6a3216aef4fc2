"""curves.png: written at the end of a run and by `pretrain plot`, with a panel per metric."""

from __future__ import annotations

import json
import logging
import struct

import pytest
from helpers import one_torch_thread, refused, train_in_process
from PIL import Image

from pretrain.cli import main
from pretrain.training import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for every test here (see helpers.one_torch_thread)."""
    with one_torch_thread():
        yield


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk), read by hand."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_metrics(run_dir, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_metric_gets_its_panel(tmp_path):
    train = {"samples_seen": 64, "lr": 1e-3, "samples_per_s": 50.0, "data_wait": 0.1, "grad_norm": None}
    coca = {"loss": 5.0, "loss_contrastive": 3.0, "loss_caption": 1.0}
    rows = [{"step": s, **train, **coca} for s in (10, 20, 30)]
    rows += [
        {"step": 30, "eval": "imagenet", "task": "zeroshot_classification", "top1": 0.5, "top5": 0.9,
         "mean_per_class_recall": 0.48, "samples": 1000, "seconds": 12.5},
        {"step": 30, "eval": "coco", "task": "zeroshot_retrieval", **{
            f"{kind}_retrieval_recall@{k}": 0.1 * k for kind in ("image", "text") for k in (1, 5, 10)},
         "samples": 100, "captions": 500, "seconds": 3.25},
        {"step": 30, "eval": "val", "task": "contrastive_loss", "val_loss_whole_set": 2.5, "val_loss_chance": 6.9,
         "samples": 1000, "seconds": 0.5},
    ]  # fmt: skip
    write_metrics(tmp_path / "run", rows)
    path, titles = plot.plot_run(tmp_path / "run")
    assert titles == [
        "loss", "lr", "samples/s", "data wait",
        "eval imagenet: topk", "eval imagenet: mean_per_class_recall",
        "eval coco: image_retrieval_recall@k", "eval coco: text_retrieval_recall@k",
        "eval val: val_loss_whole_set",
    ]  # fmt: skip
    assert path == tmp_path / "run/curves.png"
    width, height = png_size(path)
    assert (width, height) == Image.open(path).size and width > 1000 and height > 1500  # 2 columns x 5 rows
    panels = {p.title: p for p in plot.build_panels(rows)}
    assert sorted(panels["loss"].series) == ["loss", "loss_caption", "loss_contrastive"]
    assert panels["eval imagenet: topk"].series == {"top1": ([30], [0.5]), "top5": ([30], [0.9])}
    # one eval point: a large dot with its value written beside it, not an empty-looking panel
    figure = plot.build_figure(list(panels.values()))
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in figure.axes if ax.get_visible()}
    assert texts["eval imagenet: topk"] == ["0.5", "0.9"] and texts["eval val: val_loss_whole_set"] == ["2.5"]
    assert texts["loss"] == []  # three points: a curve


def test_a_single_loss_part_is_not_drawn_over_the_loss():
    """CLIP logs `loss_contrastive` equal to `loss`: one line, not two on top of each other."""
    rows = [{"step": s, "loss": 3.0 / s, "loss_contrastive": 3.0 / s} for s in (1, 2)]
    assert list(plot.build_panels(rows)[0].series) == ["loss"]


def test_a_training_run_ends_with_its_curves(tmp_path):
    run_dir = train_in_process(tmp_path, ["train.steps=2"])
    assert png_size(run_dir / "curves.png")[0] > 0
    _, titles = plot.plot_run(run_dir, tmp_path / "again.png")
    assert titles == ["loss", "lr", "samples/s", "data wait"]


def test_a_failing_plot_never_fails_the_run(tmp_path, monkeypatch, caplog):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(plot, "_draw", broken)
    run_dir = train_in_process(tmp_path, ["train.steps=1"])
    assert (run_dir / "checkpoints/step_00000001").is_dir() and not (run_dir / "curves.png").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "curves" in w] == ["curves.png not written: OSError: disk full"]


def test_plot_command_writes_where_asked(tmp_path, capsys):
    write_metrics(
        tmp_path / "run", [{"step": 1, "loss": 3.0, "lr": 0.1, "samples_per_s": 9.0, "data_wait": 0.0}]
    )
    assert main(["plot", str(tmp_path / "run"), "--output", str(tmp_path / "out/c.png")]) == 0
    assert png_size(tmp_path / "out/c.png")[0] > 0
    assert "4 panels: loss, lr, samples/s, data wait" in capsys.readouterr().out


def test_plot_command_without_metrics_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    line = refused(["plot", str(tmp_path / "run")], capsys, not_made=tmp_path / "run/curves.png")
    assert (
        line
        == f"pretrain plot: error: {tmp_path / 'run/metrics.jsonl'}: not found (pretrain plot reads a run directory's metrics.jsonl)"
    )


def test_plot_command_names_a_bad_line(tmp_path, capsys):
    write_metrics(tmp_path / "run", [{"step": 1, "loss": 3.0}])
    with (tmp_path / "run/metrics.jsonl").open("a") as f:
        f.write("not json\n")
    assert main(["plot", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl:2: not a JSON line" in err
