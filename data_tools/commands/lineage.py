"""``lineage``: how a data set was made, from the lineage file next to it."""

from __future__ import annotations

import argparse

HELP = "print how a folder or keep list was made: each curation stage once, with its counts"
DESCRIPTION = (
    "Read the lineage of a stage's output (DIR/lineage.json, or STEM_lineage.json beside a file such as a "
    "keep list) and print its chain, parents first: samples in -> out, the settings that decide what is "
    "kept, and each stage's counts. --json prints the file itself."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lineage``."""
    parser.add_argument("output", metavar="DIR|FILE|URL", help="a stage's output (folder, keep list, URL)")
    parser.add_argument("--json", action="store_true", help="print the lineage document as JSON")


def run(args: argparse.Namespace) -> None:
    """Print the chain (or the document); an output without lineage is one line, exit status 2."""
    import json

    from webshards.lineage import lineage_file, read_lineage
    from webshards.lineage_summary import summary_lines
    from webshards.urls import redact_url

    path = lineage_file(args.output)
    doc = read_lineage(path)
    if doc is None:
        raise ValueError(
            f"no lineage recorded for {redact_url(str(args.output))} (looked for {redact_url(str(path))})"
        )
    print(json.dumps(doc, indent=1) if args.json else "\n".join(summary_lines(doc, markdown=False)))
