"""The ``data-tools`` command: parse arguments and dispatch to one subcommand per curation step."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from data_tools.images import RESIZE_MODES, ImageConfig
from data_tools.runner import RunSummary

PROG = "data-tools"


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_demo_data(subparsers: argparse._SubParsersAction) -> None:
    """``demo-data``: write the procedural coloured-shapes image-text set."""
    parser = subparsers.add_parser(
        "demo-data",
        help="write the procedural demo image-text set (train/ and eval/ shards)",
        description="Write 32 classes of coloured shapes with varied captions as img2dataset shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--output", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR", help="output folder")
    add("--samples", type=int_at_least(1), default=64000, metavar="N", help="training samples")
    add("--eval-samples", type=int_at_least(0), default=1600, metavar="N", help="held-out eval samples")
    add("--image-size", type=int_at_least(16), default=64, metavar="N", help="image side in pixels")
    add("--samples-per-shard", type=int_at_least(1), default=4000, metavar="N", help="samples per tar")
    add("--seed", type=int_at_least(0), default=0, metavar="N", help="same seed, same bytes")
    add("--workers", type=int_at_least(1), default=2, metavar="N", help="processes writing shards")
    parser.set_defaults(run=run_demo_data)


def run_demo_data(args: argparse.Namespace) -> None:
    """Write the demo set and print a short summary."""
    from data_tools.demo import write_demo_data  # imported here so `--help` stays fast

    start = time.perf_counter()
    info = write_demo_data(
        args.output,
        samples=args.samples,
        eval_samples=args.eval_samples,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        workers=args.workers,
    )
    seconds = time.perf_counter() - start
    print(
        f"demo data in {args.output}: train {info['samples']} samples (shards: {info['train_shards']}), "
        f"eval {info['eval_samples']} samples (shards: {info['eval_shards']}), {info['classes']} classes; "
        f"shards written: {info['shards_written']}, skipped: {info['shards_skipped']}; {seconds:.1f} s"
    )


def setup_logging() -> None:
    """data_tools logs progress summaries at INFO: show them as bare lines on stderr."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("data_tools").setLevel(logging.INFO)


def float_at_least(minimum: float) -> Callable[[str], float]:
    """An argparse type for numbers no smaller than ``minimum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= minimum:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--rank``, ``--world``: how a runner job spreads over processes and nodes."""
    add = parser.add_argument
    add("--workers", type=int_at_least(1), default=1, metavar="N", help="processes, one task each at a time")
    add(
        "--rank",
        type=int_at_least(0),
        default=None,
        metavar="R",
        help="this node (default: RANK/SLURM_PROCID, else 0)",
    )
    add(
        "--world",
        type=int_at_least(1),
        default=None,
        metavar="W",
        help="nodes (default: WORLD_SIZE/SLURM_NTASKS, else 1)",
    )


def job_status(summary: RunSummary) -> int:
    """The exit status of a runner job: 1 when tasks failed (the runner logged which and why), else 0."""
    if summary.ok():
        return 0
    print(
        f"{PROG}: error: {len(summary.failed)} task(s) failed, see above; rerun to retry them",
        file=sys.stderr,
    )
    return 1


def add_build(subparsers: argparse._SubParsersAction) -> None:
    """``build``: image folder or table of paths/URLs -> shards in the img2dataset layout."""
    parser = subparsers.add_parser(
        "build",
        help="build WebDataset shards from an image folder or a table of paths/URLs with captions",
        description="Fetch, resize and write images with captions as img2dataset-layout shards. Resumable; "
        "rows go to shards by row order, so the output does not depend on --workers or nodes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--input",
        type=Path,
        required=True,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="folder or CSV/TSV/JSONL/parquet",
    )
    add("--output", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR", help="output folder")
    add("--samples-per-shard", type=int_at_least(1), default=10000, metavar="N", help="input rows per shard")
    add("--image-size", type=int_at_least(1), default=256, metavar="N", help="target side in pixels")
    add("--resize-mode", choices=RESIZE_MODES, default="keep_ratio", help="as img2dataset")
    add("--jpeg-quality", type=int_at_least(1), default=95, metavar="Q", help="quality of re-encoded JPEGs")
    add(
        "--max-aspect-ratio",
        type=float_at_least(1.0),
        default=None,
        metavar="R",
        help="reject more elongated images",
    )
    add(
        "--url-col",
        default=None,
        metavar="C",
        help="table column with URLs or paths (default: url/path/image/...)",
    )
    add(
        "--caption-col",
        default=None,
        metavar="C",
        help="table column with captions (default: caption/text/title)",
    )
    add("--threads", type=int_at_least(1), default=8, metavar="N", help="images fetched at once per worker")
    add("--timeout", type=float_at_least(0.1), default=10.0, metavar="S", help="seconds per URL download")
    add("--retries", type=int_at_least(0), default=2, metavar="N", help="retries of a failed download")
    add_runner_args(parser)
    parser.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> int:
    """Build shards and print where they are."""
    from data_tools.build import FetchConfig, build

    image = ImageConfig(args.image_size, args.resize_mode, args.jpeg_quality, args.max_aspect_ratio)
    fetching = FetchConfig(args.threads, args.timeout, args.retries)
    summary = build(
        args.input,
        args.output,
        args.samples_per_shard,
        image,
        fetching,
        args.url_col,
        args.caption_col,
        workers=args.workers,
        rank=args.rank,
        world=args.world,
    )
    print(f"build: {describe_shards(args.output)}")
    return job_status(summary)


def describe_shards(folder: Path) -> str:
    """E.g. ``3 complete shards, 250 samples in out/`` (from the ``_stats.json`` files)."""
    from data_tools.shards import read_sizes

    sizes = read_sizes(folder)
    return f"{len(sizes)} complete shards, {sum(sizes.values())} samples in {folder}/"


def add_reshard(subparsers: argparse._SubParsersAction) -> None:
    """``reshard``: the samples selected by keep lists -> new shards of a chosen size."""
    parser = subparsers.add_parser(
        "reshard",
        help="write the samples selected by keep lists into new shards",
        description="Copy the samples whose uid is in every keep list (a uid listed k times is written k "
        "times) into new shards. Resumable; the output does not depend on --workers or nodes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--shards",
        required=True,
        default=argparse.SUPPRESS,
        metavar="SPEC",
        help="input shards, e.g. 'in/{00000..00009}.tar'",
    )
    add(
        "--keep",
        type=Path,
        action="append",
        required=True,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="keep list (parquet with uid, or DataComp .npy); repeat to intersect",
    )
    add("--output", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR", help="output folder")
    add(
        "--samples-per-shard",
        type=int_at_least(1),
        default=10000,
        metavar="N",
        help="samples per output shard",
    )
    add(
        "--shuffle-buffer",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help="shuffle within windows of N samples (0: keep order)",
    )
    add("--seed", type=int_at_least(0), default=0, metavar="S", help="seed of the shuffle")
    add_runner_args(parser)
    parser.set_defaults(run=run_reshard)


def run_reshard(args: argparse.Namespace) -> int:
    """Reshard and print where the new shards are."""
    from data_tools.reshard import reshard

    summary = reshard(
        args.shards,
        args.keep,
        args.output,
        args.samples_per_shard,
        args.shuffle_buffer,
        args.seed,
        workers=args.workers,
        rank=args.rank,
        world=args.world,
    )
    print(f"reshard: {describe_shards(args.output)}")
    return job_status(summary)


def add_stats(subparsers: argparse._SubParsersAction) -> None:
    """``stats``: counts and distributions of a set of shards."""
    parser = subparsers.add_parser(
        "stats",
        help="print counts and distributions (image size, caption length, clip score) of shards",
        description="Count samples and failures by status and summarise image sizes, caption lengths and "
        "(with --embeddings) clip scores. With --output, also write stats.json and PNG histograms.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--shards",
        required=True,
        default=argparse.SUPPRESS,
        metavar="SPEC",
        help="shards, e.g. 'out/{00000..00009}.tar'",
    )
    add(
        "--embeddings",
        type=Path,
        default=None,
        metavar="DIR",
        help="embeddings folder (metadata/*.parquet with clip_score)",
    )
    add("--output", type=Path, default=None, metavar="DIR", help="write stats.json and histograms here")
    parser.set_defaults(run=run_stats)


def run_stats(args: argparse.Namespace) -> None:
    """Print the stats table; write the report files with ``--output``."""
    from data_tools.stats import format_table, gather, write_report

    stats = gather(args.shards, args.embeddings)
    print(format_table(stats))
    if args.output is not None:
        files = write_report(stats, args.output)
        print(f"stats: wrote {len(files)} files to {args.output}/")


def add_embed(subparsers: argparse._SubParsersAction) -> None:
    """``embed``: CLIP image and text embeddings of shards, in the clip-retrieval layout."""
    parser = subparsers.add_parser(
        "embed",
        help="CLIP image/text embeddings and clip scores of shards (clip-retrieval layout)",
        description="Embed every sample with a CLIP model: img_emb/, text_emb/ (float16, L2-normalised) and "
        "metadata/ (key, uid, caption, clip_score), one file each per input shard. Resumable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--shards", required=True, default=argparse.SUPPRESS, metavar="SPEC", help="input shards")
    add(
        "--model",
        required=True,
        default=argparse.SUPPRESS,
        metavar="NAME|PATH",
        help="open_clip name, export folder, checkpoint folder or run directory",
    )
    add("--output", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR", help="output folder")
    add("--batch-size", type=int_at_least(1), default=256, metavar="N", help="samples per forward pass")
    add("--pretrained", default=None, metavar="TAG", help="open_clip pretrained tag (with an open_clip name)")
    add("--device", choices=("cpu", "cuda"), default="cpu", help="cuda runs under bf16 autocast")
    add_runner_args(parser)
    parser.set_defaults(run=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    """Embed the shards and print where the embeddings are."""
    from data_tools.embed import EmbedConfig, embed_shards
    from pretrain.data.spec import expand_urls

    cfg = EmbedConfig(args.model, args.pretrained, args.batch_size, args.device)
    summary = embed_shards(expand_urls(args.shards), args.output, cfg, args.workers, args.rank, args.world)
    done = f"{summary.samples} samples embedded, {len(summary.skipped)} shards already done"
    print(f"embed: {done} -> {args.output}")
    return job_status(summary)


def add_filter(subparsers: argparse._SubParsersAction) -> None:
    """``filter``: a keep list from clip scores and basic image/caption rules."""
    parser = subparsers.add_parser(
        "filter",
        help="keep list by clip score threshold or top fraction, plus size/aspect/caption rules",
        description="Write a keep list (parquet with uid) of the samples of an embeddings folder that pass "
        "every rule, a summary json and a PNG histogram of clip scores next to it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--embeddings", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR", help="from embed")
    score = parser.add_mutually_exclusive_group(required=True)
    score.add_argument("--min-score", type=float_at_least(-1.0), metavar="X", help="least clip_score kept")
    score.add_argument("--keep-fraction", type=float_at_least(0.0), metavar="F", help="keep the top F")
    add("--output", type=Path, required=True, default=argparse.SUPPRESS, metavar="FILE", help="keep list")
    add("--format", choices=("parquet", "datacomp"), default="parquet", help="datacomp: also FILE.npy")
    add("--min-side", type=int_at_least(1), default=None, metavar="N", help="least original image side")
    add("--max-aspect-ratio", type=float_at_least(1.0), default=None, metavar="R", help="long/short side")
    add("--min-words", type=int_at_least(0), default=None, metavar="N", help="least caption words")
    add("--shards", default=None, metavar="SPEC", help="the embedded shards, when sizes must come from them")
    parser.set_defaults(run=run_filter)


def run_filter(args: argparse.Namespace) -> None:
    """Filter and print what was kept."""
    from data_tools.filter import FilterConfig, filter_embeddings
    from pretrain.data.spec import expand_urls

    rules = (args.min_score, args.keep_fraction, args.min_side, args.max_aspect_ratio, args.min_words)
    urls = expand_urls(args.shards) if args.shards else None
    summary = filter_embeddings(args.embeddings, args.output, FilterConfig(*rules), args.format, urls)
    threshold = summary["score_threshold"]
    print(
        f"filter: kept {summary['kept']} of {summary['samples']} samples ({summary['kept_fraction']:.1%}), "
        f"score threshold {threshold if threshold is None else round(threshold, 4)} -> {args.output}"
    )


def add_dedup(subparsers: argparse._SubParsersAction) -> None:
    """``dedup``: exact, perceptual or semantic duplicate groups and a keep list."""
    from data_tools.dedup import KEEP_POLICIES, METHODS

    parser = subparsers.add_parser(
        "dedup",
        help="find exact (sha256), perceptual (pHash) or semantic (SemDeDup) duplicates",
        description="Group duplicates and keep one per group: writes DIR/duplicates.parquet (key, uid, group, "
        "keep), DIR/keep.parquet and DIR/report.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    policies = sorted({p for names in KEEP_POLICIES.values() for p in names})
    add = parser.add_argument
    add("--shards", default=None, metavar="SPEC", help="input shards (exact, perceptual)")
    add("--method", choices=METHODS, required=True, default=argparse.SUPPRESS, help="duplicate kind")
    add("--embeddings", type=Path, default=None, metavar="DIR", help="from embed (semantic)")
    add("--threshold", type=float_at_least(0.0), metavar="T", help="perceptual: bits (10); semantic: eps")
    add("--output", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR", help="output folder")
    add("--keep-policy", choices=policies, default=None, help="which member of a group to keep (see docs)")
    add("--with-caption", action="store_true", help="exact: the normalised caption must match too")
    add("--clusters", type=int_at_least(1), default=None, metavar="K", help="semantic: k-means clusters")
    add("--probes", type=int_at_least(1), default=3, metavar="N", help="semantic: clusters checked per item")
    add("--seed", type=int_at_least(0), default=0, metavar="S", help="semantic: k-means seed")
    add("--workers", type=int_at_least(1), default=1, metavar="N", help="processes hashing shards")
    parser.set_defaults(run=run_dedup)


def run_dedup(args: argparse.Namespace) -> None:
    """Deduplicate and print the totals."""
    from data_tools.dedup import DedupConfig, find_duplicates
    from pretrain.data.spec import expand_urls

    options = (args.threshold, args.keep_policy, args.with_caption, args.clusters, args.probes, args.seed)
    cfg = DedupConfig(args.method, *options)
    urls = expand_urls(args.shards) if args.shards else None
    report = find_duplicates(args.output, cfg, urls, args.embeddings, args.workers)
    print(
        f"dedup ({args.method}): {report['items']} items, {report['groups']} duplicate groups, "
        f"{report['removed']} removed, {report['kept']} kept -> {args.output}/keep.parquet "
        f"({report['seconds']:.1f} s)"
    )


def build_parser() -> ArgumentParser:
    """The parser for every subcommand."""
    parser = ArgumentParser(prog=PROG, description="Curate image-text data into WebDataset shards.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_data(subparsers)
    add_build(subparsers)
    add_reshard(subparsers)
    add_stats(subparsers)
    add_embed(subparsers)
    add_filter(subparsers)
    add_dedup(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``data-tools``; returns the exit status (0 on success, 2 on bad arguments, 1 on errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument (2): already printed
        return exit_.code if isinstance(exit_.code, int) else 1
    setup_logging()
    try:
        status = args.run(args)
    except ValueError as error:  # invalid inputs found while running: one line, no traceback
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return status or 0  # a run function may return 1 (e.g. some tasks failed)


if __name__ == "__main__":
    sys.exit(main())
