"""`make demo`: build the procedural data set, train tiny-clip on CPU, evaluate zero-shot, export.

Prints a results table with the time of each stage and PASS/FAIL against the targets. A captioning model
(`make demo-coca`: tiny-coca) is also scored on its generated captions of the eval images. The demo's run
directory is recreated each time.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from pretrain.config import load_config
from pretrain.evaluation.caption import CaptionResult, run_caption_eval
from pretrain.publish.export import export
from pretrain.training.metrics import read_metrics, setup_logging
from pretrain.training.trainer import Trainer
from webshards.demo_data import write_demo_data

TARGET_TOP1 = 0.90
# A CoCa (`make demo-coca`) spends part of its capacity and time on captioning: issue 10's aim is 0.80 on both.
TARGET_TOP1_CAPTIONER = 0.80
TARGET_CAPTION = 0.80


def train_demo(config: str, data: Path, overrides: list[str]) -> tuple[dict | None, Path, Trainer]:
    """Train on the demo shards, evaluating on the demo's eval sets; returns the final results by eval name
    (None when a signal stopped the run before them), the run directory and the (closed) trainer, whose
    model is the trained one."""
    info = json.loads((data / "demo.json").read_text())
    tasks = ", ".join(
        f"{{name: {json.dumps(name)}, root: {json.dumps(str(data / root))}}}"
        for name, root in info.get("eval_sets", {}).items()
    )
    cfg = load_config(config, [f"data.train={data / info['train']}", f"eval.tasks=[{tasks}]", *overrides])
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    if trainer.preempted or trainer.interrupted:
        return None, cfg.run_dir, trainer
    evals = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "eval" in r]
    return {r["eval"]: r for r in evals if r["step"] == evals[-1]["step"]}, cfg.run_dir, trainer


def caption_demo(trainer: Trainer, data: Path) -> CaptionResult | None:
    """The caption score of the trained model on the eval images; None for a model without a caption decoder."""
    model = trainer.bundle.model
    if not hasattr(model, "text_decoder"):
        return None
    images = json.loads((data / "demo.json").read_text())["eval_samples"]
    return run_caption_eval(model, trainer.bundle, data, trainer.device, total=images)


def verdict(value: float, target: float) -> str:
    return f"{value:.3f}  (target >= {target:.2f}: {'PASS' if value >= target else 'FAIL'})"


def caption_rows(result: CaptionResult | None) -> list[tuple[str, str]]:
    """The table's caption score and example captions (none for a CLIP model)."""
    if result is None:
        return []
    examples = [(f"caption of a {name}", f'"{caption}"') for name, caption in result.examples]
    return [("caption names colour + shape", verdict(result.score, TARGET_CAPTION)), *examples]


def write_data(folder: Path) -> None:
    try:
        write_demo_data(folder)
    except ValueError as e:  # written by an older demo or other settings: the demo's own folder, redraw it
        print(f"redrawing the demo data: {e}")
        shutil.rmtree(folder)
        write_demo_data(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("runs/demo-data"))
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    setup_logging(is_main=True)  # before the data, whose progress lines are webshards'
    logging.getLogger("webshards").setLevel(logging.INFO)
    times = {}
    start = time.perf_counter()
    write_data(args.data)
    times["demo data"] = time.perf_counter() - start
    results, run_dir, trainer = train_demo(args.config, args.data, args.overrides)
    if results is None:
        print(f"demo: stopped by a signal before the final evaluation; the run so far is in {run_dir}")
        return 1
    times["train + eval"] = time.perf_counter() - start - times["demo data"]
    captions = caption_demo(trainer, args.data)
    if captions is not None:
        times["captions"] = time.perf_counter() - start - sum(times.values())
    export(run_dir, run_dir / "export")
    times["total"] = time.perf_counter() - start
    result, retrieval = results["zeroshot"], results.get("demo-retrieval", {})
    target_top1 = TARGET_TOP1 if captions is None else TARGET_TOP1_CAPTIONER
    ok = result["top1"] >= target_top1 and (captions is None or captions.score >= TARGET_CAPTION)
    curves = run_dir / "curves.png"  # drawn by the trainer at the end of the run
    rows = [
        ("zero-shot top-1", verdict(result["top1"], target_top1)),
        ("zero-shot top-5", f"{result['top5']:.3f}"),
        *caption_rows(captions),
        ("eval images", str(result["samples"])),
        *[(f"retrieval {k}", f"{v:.3f}") for k, v in retrieval.items() if "recall@" in k],
        *[(f"time: {k}", f"{v:.1f} s") for k, v in times.items()],
        ("run directory", str(run_dir)),
        ("curves", str(curves) if curves.is_file() else "not drawn (see the warning above)"),
        ("export (open_clip local-dir:)", str(run_dir / "export")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
