"""`pretrain push`: an export folder to the Hugging Face Hub or under an fsspec URL."""

from __future__ import annotations

import argparse

HELP = "publish an export to the Hugging Face Hub or an fsspec store"
DESCRIPTION = (
    "Upload an export folder (`pretrain export`) to a Hugging Face Hub model repo (endpoint: HF_ENDPOINT, "
    "token: HF_TOKEN or the saved login) or under any fsspec URL, a _COMPLETE marker written last."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `push`."""
    add = parser.add_argument
    add("--export", required=True, metavar="DIR", help="export folder (`pretrain export --output`)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", metavar="ORG/NAME", help="Hub model repo (created if absent)")
    target.add_argument(
        "--to", metavar="URL", help="fsspec URL, e.g. s3://bucket/prefix (s3: AWS_ENDPOINT_URL)"
    )
    add("--revision", help="Hub branch to commit to, created if absent (default: main)")
    add("--private", action="store_true", help="create the Hub repo private")
    add("--dry-run", action="store_true", help="list the files, sizes and target; upload nothing")


def run(args: argparse.Namespace) -> None:
    """Push (or list what would be pushed) and print one line per file."""
    from pretrain.publish.push import push_to_hub, push_to_url

    if args.to and (args.revision or args.private):
        raise ValueError("--revision and --private apply to --repo-id only, not --to")
    if args.to:
        lines = push_to_url(args.export, args.to, args.dry_run)
    else:
        lines = push_to_hub(args.export, args.repo_id, args.revision, args.private, args.dry_run)
    print("\n".join(lines))
