"""`pretrain plot RUN_DIR`: curves.png from metrics.jsonl, one panel per quantity against the step.

Training panels: `loss` (with its parts `loss_*` when the objective has more than one: a single part equals
the loss and would hide under it), `lr`, `samples/s`, `data wait`. Eval panels: one per eval name and metric
group, for every float metric an eval line carries (wall time and counts are not curves; a group is the
metrics that differ only by a trailing number: `top1`/`top5` -> `topk`, `text_retrieval_recall@1/5/10` ->
`text_retrieval_recall@k`), titled `eval NAME: GROUP`. A series of one point is drawn as a large dot with its
value written beside it. Drawn on matplotlib's Agg canvas (no display, no pyplot state), so it works on
headless nodes and inside a training process.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.training.metrics import EVAL_NOT_METRICS
from webshards.atomic import atomic_path

log = logging.getLogger("pretrain")

TRAIN_PANELS = (("lr", "lr"), ("samples/s", "samples_per_s"), ("data wait", "data_wait"))
"""Training panels after the loss panel: (title, metrics key)."""


@dataclass
class Panel:
    title: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    """Line label -> (steps, values)."""

    def add(self, label: str, step: int, value: float) -> None:
        steps, values = self.series.setdefault(label, ([], []))
        steps.append(step)
        values.append(value)


def read_rows(path: Path) -> list[dict]:
    """The lines of metrics.jsonl; a missing file or a bad line is one error naming the file (and line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (pretrain plot reads a run directory's metrics.jsonl)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: a metrics line must be a JSON object with an integer 'step'")
        rows.append(row)
    return rows


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_group(key: str) -> str:
    """`top1` -> `topk`, `image_retrieval_recall@5` -> `image_retrieval_recall@k`, others unchanged."""
    match = re.fullmatch(r"(.*?\D)(\d+)", key)
    return f"{match.group(1)}k" if match else key


def build_panels(rows: list[dict]) -> list[Panel]:
    """The panels to draw, training first (in TRAIN_PANELS order), then evals in order of appearance."""
    train = [r for r in rows if "eval" not in r]
    parts = sorted({k for r in train for k in r if k.startswith("loss_")})
    loss_keys = ["loss"] + (parts if len(parts) > 1 else [])
    panels = [Panel("loss")] + [Panel(title) for title, _ in TRAIN_PANELS]
    for row in train:
        for key in loss_keys:
            if _number(row.get(key)):
                panels[0].add(key, row["step"], float(row[key]))
        for panel, (_, key) in zip(panels[1:], TRAIN_PANELS):
            if _number(row.get(key)):
                panel.add(key, row["step"], float(row[key]))
    evals: dict[str, Panel] = {}
    for row in rows:
        if "eval" not in row:
            continue
        for key, value in row.items():
            if key not in EVAL_NOT_METRICS and isinstance(value, float) and math.isfinite(value):
                title = f"eval {row['eval']}: {metric_group(key)}"
                evals.setdefault(title, Panel(title)).add(key, row["step"], value)
    return [p for p in panels if p.series] + list(evals.values())


def _draw(panels: list[Panel], output: Path) -> None:
    figure = build_figure(panels)
    with atomic_path(output) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def build_figure(panels: list[Panel]):
    """The matplotlib Figure of `panels` (two columns), on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    height = 3.4 * rows
    figure = Figure(figsize=(6.4 * columns, height))
    # fixed margins in inches (title above, tick labels and "step" below each panel): constrained layout
    # gave the same picture and took 60% of the drawing time (~0.8 s at the end of every run)
    figure.subplots_adjust(
        left=0.07 if columns == 2 else 0.12, right=0.98, top=1 - 0.32 / height, bottom=0.5 / height,
        hspace=0.32, wspace=0.18,
    )  # fmt: skip
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    steps_seen = [step for panel in panels for steps, _ in panel.series.values() for step in steps]
    low, high = min(steps_seen), max(steps_seen)
    pad = (
        0.04 * (high - low) or 1.0
    )  # every panel on the run's step range: an end-of-run eval sits at the end
    for ax, panel in zip(axes, panels):
        ax.set_xlim(low - pad, high + pad)
        ax.margins(y=0.15)
        for label, (steps, values) in panel.series.items():
            single = len(steps) == 1
            marker = "o" if len(steps) <= 20 else None
            ax.plot(steps, values, label=label, marker=marker, markersize=8 if single else 3)
            if single:  # one eval at the end: a dot alone reads as an empty panel without its value
                ax.annotate(
                    f"{values[0]:.4g}",
                    (steps[0], values[0]),
                    xytext=(-8, 6),
                    textcoords="offset points",
                    ha="right",
                )
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return figure


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> tuple[Path, list[str]]:
    """Write the curves of `run_dir` (default `run_dir/curves.png`); returns the file and the panel titles."""
    run_dir = Path(run_dir)
    panels = build_panels(read_rows(run_dir / "metrics.jsonl"))
    if not panels:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no metrics to plot")
    try:
        import matplotlib  # noqa: F401 - a clear message instead of an ImportError traceback
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from None
    path = Path(output) if output is not None else run_dir / "curves.png"
    _draw(panels, path)
    return path, [p.title for p in panels]


def write_curves(run_dir: Path) -> Path | None:
    """curves.png at the end of a run; a plot never fails a run, so any problem is a warning."""
    try:
        path, _ = plot_run(run_dir)
    except Exception as e:
        log.warning("curves.png not written: %s: %s", type(e).__name__, e)
        return None
    log.info("wrote %s", path)
    return path
