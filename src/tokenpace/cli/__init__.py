"""The ``tokenpace`` command line. tokenpace's own input errors (TokenpaceError) end in one line and exit code 2;
any other exception is a bug and keeps its traceback. torch and timm are imported only once a command runs."""
from __future__ import annotations

import importlib
import sys

from ..errors import TokenpaceError
from .parser import make_parser, normalise

__all__ = ["main", "make_parser"]


def _set_malloc(choice: str | None) -> str:
    """Apply --malloc; None is a command's default of 'keep where glibc allows it'. Returns what is in effect."""
    from ..runtime import keep_freed_memory

    if choice == "system":
        return choice
    try:
        keep_freed_memory()
    except RuntimeError as err:
        if choice == "keep":
            raise TokenpaceError(str(err)) from None
        print("tokenpace: note: the C library is not glibc: freed memory goes back to the system (--malloc "
              "system); CPU timings may vary more between runs", file=sys.stderr)
        return "system"
    return "keep"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a child process of this command repeats
    try:
        normalise(args)
        if hasattr(args, "malloc"):
            args.malloc = _set_malloc(args.malloc)
        return importlib.import_module(f"{__name__}.{args.command_module}").run(args)
    except TokenpaceError as err:
        print(f"tokenpace: error: {err}", file=sys.stderr)
        return 2
