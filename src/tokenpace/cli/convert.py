"""tokenpace convert: a released checkpoint as timm / tokenpace keys plus its method configuration."""
from __future__ import annotations

import argparse

from . import source


def run(args: argparse.Namespace) -> int:
    from ..official import checkpoint_keep, convert, ratio_in_name

    keep, origin = checkpoint_keep(args.src, args.arch, args.keep)
    named = ratio_in_name(args.src)
    # refuses an existing DST (without --overwrite), SRC as DST and a bad keep before anything is read
    config = convert(args.src, args.dst, args.arch, keep=args.keep, overwrite=args.overwrite)
    clash = f"; the file name says ratio {named}" if named is not None and named != keep else ""
    source.note(f"keep {keep} ({origin}{clash})")
    print(args.dst)
    print(config)
    return 0
