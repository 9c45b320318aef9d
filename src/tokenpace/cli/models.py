"""tokenpace models: timm model names and the methods each accepts, with the reason for each refusal."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..errors import TokenpaceError
from . import source


def _print_progress(done: int, total: int) -> None:
    print(f"\rchecking {done}/{total}", end="", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..listing import format_support, list_support, summarize

    if args.json:
        source.check_output_file(args.json, "--json")
    progress = _print_progress if sys.stderr.isatty() else None
    rows = list_support(args.pattern, pretrained=not args.all, progress=progress)
    if progress is not None:
        print(file=sys.stderr)
    if not rows:
        raise TokenpaceError(f"no timm model of the ViT-like families matches {args.pattern!r}"
                             + ("" if args.all else " (with pretrained weights; --all lists every architecture)"))
    if not args.summary:
        print(format_support(rows))
        print()
    print(summarize(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return 0
