"""The ``tokenpace`` command line. tokenpace's own input errors (TokenpaceError) end in one line and exit code 2;
any other exception is a bug and keeps its traceback. torch and timm are imported only once a command runs."""
from __future__ import annotations

import importlib
import sys

from ..errors import TokenpaceError
from .parser import make_parser, normalise

__all__ = ["main", "make_parser"]


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a child process of this command repeats
    try:
        normalise(args)
        if getattr(args, "malloc", None) == "keep":  # None: the command applies its own default (tune)
            from ..runtime import keep_freed_memory

            try:
                keep_freed_memory()
            except RuntimeError as err:
                raise TokenpaceError(str(err)) from None
        return importlib.import_module(f"{__name__}.{args.command_module}").run(args)
    except TokenpaceError as err:
        print(f"tokenpace: error: {err}", file=sys.stderr)
        return 2
