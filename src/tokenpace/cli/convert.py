"""tokenpace convert: a released checkpoint as timm / tokenpace keys plus its method configuration."""
from __future__ import annotations

import argparse

from . import source


def run(args: argparse.Namespace) -> int:
    from ..config_io import config_path_for
    from ..official import checkpoint_keep, convert, ratio_in_name

    source.check_output_file(args.dst, "DST")
    source.check_output_file(config_path_for(args.dst), "DST's configuration")
    keep, origin = checkpoint_keep(args.src, args.arch, args.keep)
    named = ratio_in_name(args.src)
    config = convert(args.src, args.dst, args.arch, keep=args.keep)  # refuses a keep out of range first
    clash = f"; the file name says ratio {named}" if named is not None and named != keep else ""
    source.note(f"keep {keep} ({origin}{clash})")
    print(args.dst)
    print(config)
    return 0
