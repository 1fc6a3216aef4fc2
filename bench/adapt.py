"""The adaptation experiment (issue 25, acceptance point 4): few-shot adaptation of the demo-trained tiny-clip
to a held-out procedural domain, base-to-novel, every method `pretrain adapt` has.

1. The model: tiny-clip trained as `make demo` trains it (configs/demo.yaml on `data-tools demo-data`'s default
   32 classes; `--demo-steps N` for a shorter run), exported; cached in the work folder.
2. The data: `data-tools demo-data --domain new --adapt-samples N`: 16 colour x shape classes the default set
   never shows, a labelled train split to draw shots from and the held-out test images. Base classes are the
   first half (CoCoOp's split, `pretrain adapt --split base-to-novel`).
3. For K in --shots, every seed and every method of `pretrain.adapt.registry.available()`: `pretrain adapt
   --split base-to-novel` in this process (its output folder removed first: a rerun would resume). Zero-shot
   has no training: `pretrain eval`'s classifier (open_clip's `build_zero_shot_classifier` over the set's
   templates) on the same frozen features, scored per half by the command's own `results.evaluate`; once with
   the set's 7 templates and once with CoOp's hand-written "a photo of a {c}.".

Prints one table: base top-1, novel top-1, harmonic mean (means over seeds, ± the standard deviation with
--seeds > 1), training seconds (the method's `fit`), wall seconds (the whole command: model load, features,
training, scoring) and trainable parameters. A benchmark, not a test: nothing is checked.

    .venv/bin/python bench/adapt.py                 # the experiment: K 1 4 16, 1 seed (docs/PERFORMANCE.md)
    .venv/bin/python bench/adapt.py --seeds 3 --json runs/adapt.json
    .venv/bin/python bench/adapt.py --small         # smoke run: a 10-step model, small sets, K 1
    .venv/bin/python bench/adapt.py --checkpoint runs/demo    # another model (checkpoint, run or export)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from open_clip import build_zero_shot_classifier  # noqa: E402

from data_tools.cli import main as data_tools  # noqa: E402
from pretrain.adapt import registry  # noqa: E402
from pretrain.adapt.data import LabelledImages, cached_features  # noqa: E402
from pretrain.adapt.results import evaluate  # noqa: E402
from pretrain.cli import main as pretrain  # noqa: E402
from pretrain.commands.adapt import weights_digest  # noqa: E402
from pretrain.demo import train_demo, write_data  # noqa: E402
from pretrain.models.build import load_trained  # noqa: E402
from pretrain.publish.export import export  # noqa: E402
from webshards.demo_data import write_demo_data  # noqa: E402
from webshards.evalset import fill_template, read_eval_set  # noqa: E402

WORK = ROOT / "bench" / ".cache" / "adapt"
BUDGET = {"lora": ["iters_per_shot=100"], "glad": ["iters_per_shot=100"]}
"""Defaults that keep the whole run within ~15 minutes on 2 cores: LoRA and GLAD train both towers on pixels
for 100 steps per shot, a fifth of CLIP-LoRA's 500 (`--set lora:iters_per_shot=500` for the paper's). A key the
method's config does not have is skipped; `--set` comes after these, so it wins."""
SMALL_BUDGET = {method: ["epochs=2", "steps=2"] for method in ("linear-probe", "coop", "pre", "lora", "glad")}
"""`--small`: a couple of steps of each method (a smoke run)."""
HAND_WRITTEN = "a photo of a {c}."
"""CoOp's hand-written prompt (its zero-shot baseline and its context's initialisation)."""


def demo_export(work: Path, steps: int | None, small: bool) -> Path:
    """The export folder of tiny-clip trained as `make demo` does (configs/demo.yaml, `steps` if given);
    trained once per setting and reused. `small`: configs/tiny.yaml for 10 steps on a small demo set."""
    name = "small" if small else "demo" if steps is None else f"demo-{steps}"
    folder = work / name / "export"
    if (folder / "open_clip_config.json").is_file():
        return folder
    data = work / ("demo-data-small" if small else "demo-data")
    if small:
        write_demo_data(data, samples=256, eval_samples=64, samples_per_shard=64, workers=1)
    else:
        write_data(data)  # `make demo`'s data
    config = "configs/tiny.yaml" if small else "configs/demo.yaml"
    overrides = [f"run.dir={work}", f"run.name={name}"]
    overrides += ["train.steps=10", "train.batch_size=32", "checkpoint.every=10"] if small else []
    overrides += [f"train.steps={steps}", f"checkpoint.every={steps}"] if steps and not small else []
    started = time.perf_counter()
    results, run_dir, _ = train_demo(str(ROOT / config), data, overrides)
    if results is None:
        raise SystemExit("training the demo model stopped before its end")
    print(f"trained {name}: zero-shot top-1 {results['zeroshot']['top1']:.3f} on the demo's 32 classes "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)  # fmt: skip
    return export(run_dir, folder)


def held_out_set(work: Path, train_images: int, test_images: int) -> Path:
    """`data-tools demo-data --domain new --adapt-samples N`: the held-out domain's adaptation set."""
    output = work / f"new-{train_images}-{test_images}"
    args = ["demo-data", "--output", str(output), "--domain", "new", "--samples", "64"]
    args += ["--eval-samples", str(test_images), "--adapt-samples", str(train_images), "--workers", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        if data_tools(args) != 0:
            raise SystemExit(f"data-tools {' '.join(args)} failed")
    return output / "adapt"


class ZeroShot:
    """The zero-shot classifier as an adapted model (nothing trained): what `pretrain eval` scores, on the
    frozen features the methods use, so `results.evaluate` scores its base and novel halves alike."""

    trainable_params = 0

    def __init__(self, bundle, templates: Sequence[str], cache: Path) -> None:
        self.bundle, self.templates, self.cache = bundle, list(templates), cache
        self.tag = f"zeroshot-{weights_digest(bundle.model)}"

    @torch.no_grad()
    def logits(self, images: LabelledImages, classnames: Sequence[str]) -> torch.Tensor:
        model, device = self.bundle.model.eval(), torch.device("cpu")
        templates = [functools.partial(fill_template, t) for t in self.templates]
        classifier = build_zero_shot_classifier(model, self.bundle.tokenizer, list(classnames), templates,
                                                device=device)  # fmt: skip
        features = cached_features(model, images, self.bundle.preprocess_val, device, self.cache, self.tag)
        return features @ classifier

    def save(self, folder: Path) -> None:
        """Nothing to save: the checkpoint itself is the zero-shot model."""


def zero_shot_rows(checkpoint: Path, data: Path, work: Path) -> list[dict]:
    """Zero-shot base/novel scores with the set's templates and with the hand-written one."""
    bundle = load_trained(checkpoint)
    rows = []
    for name, templates in (
        ("zero-shot", read_eval_set(str(data)).templates),
        ("zero-shot 1 prompt", [HAND_WRITTEN]),
    ):
        started = time.perf_counter()
        metrics = evaluate(ZeroShot(bundle, templates, work / "features"), str(data), True)
        rows.append({"method": name, "shots": 0, "seed": 0, **metrics, "train_seconds": 0.0,
                     "wall_seconds": time.perf_counter() - started, "trainable_params": 0})  # fmt: skip
    return rows


def adapt_row(checkpoint: Path, data: Path, method: str, shots: int, seed: int, output: Path,
              overrides: Sequence[str]) -> dict:  # fmt: skip
    """`pretrain adapt --split base-to-novel` from scratch into `output`; its result row and wall time."""
    shutil.rmtree(output, ignore_errors=True)
    args = ["adapt", "--checkpoint", str(checkpoint), "--method", method, "--train", str(data), "--shots",
            str(shots), "--split", "base-to-novel", "--seed", str(seed), "--output", str(output), *overrides]  # fmt: skip
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the command's JSON line: results.jsonl has it too
        status = pretrain(args)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"pretrain {' '.join(args)} exited {status}")
    row = json.loads((output / "results.jsonl").read_text().splitlines()[0])
    return {**row, "seed": seed, "wall_seconds": wall}


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (method, K): means over seeds of the scores and times, and the scores' spread."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["shots"]), []).append(row)
    summary = []
    for (method, shots), group in groups.items():
        out = {
            "method": method,
            "shots": shots,
            "seeds": len(group),
            "trainable_params": group[0]["trainable_params"],
        }
        for key in ("base_top1", "novel_top1", "harmonic_mean", "train_seconds", "wall_seconds"):
            values = [r[key] for r in group if r.get(key) is not None]
            out[key] = statistics.fmean(values) if values else None
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(out)
    return summary


def _score(row: dict, key: str) -> str:
    if row[key] is None:
        return "–"
    spread = row.get(f"{key}_std")
    return f"{100 * row[key]:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def markdown(summary: list[dict]) -> str:
    """The summary as the markdown table docs/PERFORMANCE.md records (scores in percent)."""
    lines = ["| method | K | base top-1 | novel top-1 | harmonic mean | train s | wall s | trainable params |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary:
        cells = [r["method"], str(r["shots"] or "–"), _score(r, "base_top1"), _score(r, "novel_top1"),
                 _score(r, "harmonic_mean"), f"{r['train_seconds']:.1f}", f"{r['wall_seconds']:.1f}",
                 f"{r['trainable_params']:,}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_overrides(items: Sequence[str], methods: Sequence[str], small: bool) -> dict[str, list[str]]:
    """The budget's settings the methods' configs have, then the `--set METHOD:KEY=VALUE` items, by method."""
    budget = SMALL_BUDGET if small else BUDGET
    grouped: dict[str, list[str]] = {}
    for method in methods:
        keys = {f.name for f in fields(registry.method(method).config)}
        grouped[method] = [item for item in budget.get(method, []) if item.partition("=")[0] in keys]
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or method not in grouped:
            raise SystemExit(
                f"--set {item!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(methods)}"
            )
        grouped[method].append(override)
    return grouped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--work",
        type=Path,
        default=WORK,
        help="where the model, data and runs are kept (default: %(default)s)",
    )
    add("--shots", type=int, nargs="+", default=[1, 4, 16], help="K values (default: %(default)s)")
    add(
        "--seeds",
        type=int,
        default=1,
        help="seeds 0..N-1 of the shot draw and training (default: %(default)s)",
    )
    add("--methods", nargs="+", help="methods to run (default: every available one)")
    add("--set", action="append", default=[], metavar="METHOD:KEY=VALUE", help="a method's hyper-parameter")
    add("--checkpoint", type=Path, help="adapt this checkpoint or export instead of the demo model")
    add("--demo-steps", type=int, help="train the demo model this many steps (default: configs/demo.yaml's)")
    add(
        "--train-images",
        type=int,
        default=1600,
        help="the held-out set's labelled train images (default: %(default)s)",
    )
    add("--test-images", type=int, default=1600, help="its test images (default: %(default)s)")
    add("--small", action="store_true",
        help="smoke run: a 10-step model, 256 train / 64 test images, K 1, 2 epochs or steps per method")  # fmt: skip
    add("--json", type=Path, help="write every run's row and the summary here")
    args = parser.parse_args(argv)
    if args.small:
        args.shots, args.train_images, args.test_images = [1], 256, 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = args.methods or registry.available()
    for name in methods:
        registry.method(name)  # unknown or not built: one line, before any work
    overrides = method_overrides(args.set, methods, args.small)
    checkpoint = args.checkpoint or demo_export(args.work, args.demo_steps, args.small)
    data = held_out_set(args.work, args.train_images, args.test_images)
    rows = zero_shot_rows(checkpoint, data, args.work)
    for shots in args.shots:
        for method in methods:
            for seed in range(args.seeds):
                output = args.work / "runs" / f"{method}-{shots}shot-seed{seed}"
                rows.append(adapt_row(checkpoint, data, method, shots, seed, output, overrides[method]))
                print(f"{method} K={shots} seed {seed}: {rows[-1]['wall_seconds']:.1f} s", file=sys.stderr)
    summary = summarise(rows)
    print(f"model: {checkpoint}\nheld-out set: {data} (base: the first 8 of its 16 classes)")
    print(f"methods available: {', '.join(registry.available())}; torch threads: {torch.get_num_threads()}")
    print(
        "settings: "
        + ("; ".join(f"{m} {' '.join(o)}" for m, o in overrides.items() if o) or "defaults")
        + "\n"
    )
    print(markdown(summary))
    print(f"\ntotal: {sum(r['wall_seconds'] for r in rows):.0f} s of commands")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
