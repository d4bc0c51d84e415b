"""The ``unveil`` command line. Thin: parse arguments, call one public function, print/write.

Each sub-command lives in its own module of this package with a ``register(subparsers)``
function that adds its parser and sets ``func`` (called with the parsed args; returns an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .._version import __version__
from .._errors import UnveilError

# modules in this package that define sub-commands, in the order `unveil --help` lists them
_COMMAND_MODULES = ["demo", "synthetic", "capture", "world", "apply", "influence"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unveil",
        description="Learn the concepts a vision network's layer uses (encoding-decoding direction pairs), "
                    "name them, measure their influence and edit the model with them.")
    parser.add_argument("--version", action="version", version=f"unveil {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"unveil {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure is one line unless --debug
        if args.debug:
            raise
        print(f"unveil {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """The message a user sees for ``exc``: ours as written; the operating system's, an image
    decoder's or memory errors with what to do; anything else marked as a defect to report."""
    if isinstance(exc, UnveilError):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = ("out of memory; use smaller --batch-size / --image-size / fewer images, or a machine with more "
                "memory.")
    elif isinstance(exc, OSError):
        where = f" ({exc.filename!s})" if getattr(exc, "filename", None) else ""
        text = f"{exc.strerror or exc}{where}; check the path, its permissions and the free disk space."
    elif isinstance(exc, UnicodeError):
        text = f"a file or file name is not valid text ({exc}); rename or re-save it as UTF-8."
    elif type(exc).__name__ == "DecompressionBombError":  # PIL's, without importing PIL here
        text = f"refused an image that decodes to too many pixels ({exc}); resize it first."
    else:
        text = (f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback and report "
                f"it.")
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
