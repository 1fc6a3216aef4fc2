"""`pretrain adapt`: few-shot adaptation of a checkpoint on a labelled train split, scored on eval sets
(docs/adaptation.md). Parse, then: read the train set, draw the shots, fit the method, score, write."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from pretrain.adapt.registry import METHODS

HELP = "few-shot adaptation of a checkpoint: linear probe, CoOp, PRE, LoRA, GLAD"
ABOUT = (
    "Adapt a checkpoint on the labelled `train` split of an eval set in clip_benchmark's layout (ROOT/train/"
    "nshards.txt), K images per class drawn by --seed and recorded in DIR/shots.json; score on the `test` split "
    "of each --eval set (default: the train set's). Prints one JSON line per eval set (eval, method, shots, top1; "
    "base_top1, novel_top1, harmonic_mean with --split base-to-novel) and writes DIR/results.jsonl, "
    "DIR/results.md, the adapted model in DIR/model and resumable checkpoints in DIR/checkpoints (a rerun "
    "with the same settings resumes). Under torchrun the training runs on every rank (DDP)."
)


def DESCRIPTION() -> str:  # noqa: N802 (a callable DESCRIPTION: built only when `adapt --help` is shown)
    """The top of `pretrain adapt --help`: what it does, the methods, and each method's keys and defaults
    (which imports the methods' modules, hence torch: only for this help)."""
    keys = "; ".join(
        f"{name}: " + ", ".join(f"{f.name}={getattr(spec.config(), f.name)}" for f in fields(spec.config))
        for name, spec in METHODS.items()
        if spec.config is not None
    )
    methods = "; ".join(f"{name}: {spec.trains}" for name, spec in METHODS.items())
    hyper = "Hyper-parameters as KEY=VALUE (docs/adaptation.md says what each means); keys and defaults"
    return f"{ABOUT} Methods: {methods}. {hyper}: {keys}."


SETTINGS_FILE = "adapt.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `adapt`."""
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint folder, run directory, or export folder")
    add("--method", required=True, choices=list(METHODS), help="the adaptation method")
    add(
        "--train",
        required=True,
        metavar="ROOT",
        help="eval set with a labelled train split (clip_benchmark layout)",
    )
    add(
        "--shots", type=int, metavar="K", help="training images per class (default: every image of the split)"
    )
    add("--eval", action="append", default=[], metavar="ROOT",
        help="eval set whose test split is scored (repeatable; default: --train's)")  # fmt: skip
    add(
        "--output",
        required=True,
        metavar="DIR",
        help="results, shots.json, checkpoints and the adapted model",
    )
    add("--split", choices=["all", "base-to-novel"], default="all",
        help="base-to-novel: train on the first half of the classes, score base and novel classes apart "
        "(default: %(default)s)")  # fmt: skip
    add("--seed", type=int, default=0, help="seeds the shot draw and the training (default: %(default)s)")
    add(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: this rank's GPU (default: %(default)s)",
    )
    add("overrides", nargs="*", metavar="KEY=VALUE", help="the method's hyper-parameters (e.g. lr=0.01)")


def run(args: argparse.Namespace) -> None:
    """Adapt, score every eval set, write the results; rank 0 prints one JSON line per eval set."""
    import torch

    from pretrain.adapt import registry
    from pretrain.parallel.distributed import detect, init_distributed, shutdown
    from pretrain.training.metrics import setup_logging

    spec = registry.method(args.method)
    cfg = registry.build_config(spec, args.overrides)
    if args.shots is not None and args.shots < 1:
        raise ValueError(f"--shots must be at least 1, got {args.shots}")
    info = detect()
    setup_logging(info.is_main, stream=sys.stderr)  # stdout is the results
    device = torch.device(f"cuda:{info.local_rank}" if args.device == "cuda" else "cpu")
    init_distributed(info, device)
    try:
        rows = adapt(args, spec, cfg, device, info.is_main)
    finally:
        shutdown()
    if info.is_main:
        print("\n".join(json.dumps(row) for row in rows), flush=True)


def adapt(args: argparse.Namespace, spec, cfg, device, is_main: bool) -> list[dict]:
    """Fit `spec` on the shots of `--train`, score each eval set (rank 0), write DIR; returns the rows."""
    from pretrain.adapt.results import eval_name, evaluate, write_results
    from webshards.atomic import write_json_atomic

    output = Path(args.output)
    settings = check_output(args, cfg)
    run, shots = prepare(args, device, is_main)
    if is_main:  # after the inputs passed their checks: a refused run leaves no settings behind
        write_json_atomic(output / SETTINGS_FILE, settings)
    started = time.perf_counter()
    adapted = spec.fit(run, cfg)
    train_seconds = time.perf_counter() - started
    if not is_main:
        return []
    adapted.save(output / "model")
    common = {"method": spec.name, "shots": shots, "train_seconds": train_seconds,
              "trainable_params": adapted.trainable_params}  # fmt: skip
    rows = []
    for root in args.eval or [args.train]:
        started = time.perf_counter()
        metrics = evaluate(adapted, root, args.split == "base-to-novel")
        rows.append(
            {"eval": eval_name(root), **common, **metrics, "eval_seconds": time.perf_counter() - started}
        )
    write_results(output, rows)
    return rows


def check_output(args: argparse.Namespace, cfg) -> dict:
    """The settings DIR/adapt.json records (as JSON reads them back: tuples as lists); a DIR holding another
    adaptation's is refused (a rerun with the same settings resumes from its checkpoints)."""
    from webshards.tasks import check_settings

    settings = {"method": args.method, "checkpoint": str(args.checkpoint), "train": str(args.train),
                "shots": args.shots, "split": args.split, "seed": args.seed, "config": json.loads(json.dumps(asdict(cfg)))}  # fmt: skip
    check_settings(Path(args.output) / SETTINGS_FILE, settings, "an adaptation")
    return settings


def prepare(args: argparse.Namespace, device, is_main: bool):
    """The method's `AdaptRun` (model, shots, classes) and K (None: all images)."""
    from pretrain.adapt.data import AdaptRun
    from pretrain.adapt.fewshot import base_novel, restrict, sample_shots, write_shots
    from pretrain.models.build import load_trained

    train_set = read_train_set(args.train)
    pool = read_labels_checked(args.train, len(train_set.classnames))
    classnames = list(train_set.classnames)
    if args.split == "base-to-novel":
        base, _ = base_novel(len(classnames))
        pool, classnames = restrict(pool, base), [classnames[c] for c in base]
    shots = sample_shots(pool, args.shots, classnames, args.seed)
    output = Path(args.output)
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        write_shots(output, shots, classnames, args.shots, args.seed)
    bundle = load_trained(args.checkpoint, device)
    cache = output / "features" if is_main else None
    tag = f"{Path(str(args.checkpoint)).name}-{weights_digest(bundle.model)}"
    run = AdaptRun(bundle, str(args.checkpoint), device, tuple(classnames), train_set.templates, shots, pool,
                   output, args.seed, cache, tag)  # fmt: skip
    return run, args.shots


def read_train_set(root: str):
    """The eval set at ROOT read for its `train` split; a set without one is refused with one line."""
    from webshards.evalset import CLASSIFICATION, NSHARDS_FILE, join, read_eval_set, read_text

    if read_text(join(root, "train", NSHARDS_FILE)) is None:
        raise ValueError(
            f"{root}: no train split ({join(root, 'train', NSHARDS_FILE)} not found); pretrain adapt trains on "
            "labelled images of a train split (docs/adaptation.md: data-tools demo-data --adapt-samples N)"
        )
    return read_eval_set(root, CLASSIFICATION, split="train")


def read_labels_checked(root: str, classes: int):
    from pretrain.adapt.data import read_labels

    images = read_labels(root, "train")
    bad = [label for label in images.labels if not 0 <= label < classes]
    if bad:
        raise ValueError(f"{root}/train: class index {bad[0]} outside its {classes} classes")
    return images


def weights_digest(model) -> str:
    """A short fingerprint of the model's weights (shapes and the first values of every tensor): names its
    feature cache, so a run directory whose `latest` moved on never reuses stale features."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]
