"""tokenpace convert: a released checkpoint as timm / tokenpace keys plus its method configuration."""
from __future__ import annotations

import argparse

from . import source


def run(args: argparse.Namespace) -> int:
    from ..config_io import config_path_for
    from ..official import convert

    source.check_output_file(args.dst, "DST")
    source.check_output_file(config_path_for(args.dst), "DST's configuration")
    config = convert(args.src, args.dst, args.arch, keep=args.keep)
    print(args.dst)
    print(config)
    return 0
