"""`matformer <verb>`: thin wrappers over library functions.

Each verb lives in `matformer.cli.<verb>` with two functions: `add_arguments(parser)` (no
heavy imports, so `--help` is instant) and `run(args) -> int`, which imports the library lazily.
Our errors (`MatFormerError`) print as one or two lines and exit with status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from matformer import __version__
from matformer.errors import MatFormerError

# verb -> module under matformer.cli (a verb whose module is absent is not offered)
VERBS = {
    "info": "info",
    "slice": "slice",
    "train": "train",
    "prepare-data": "prepare_data",
    "generate": "generate",
    "eval": "eval",
    "export": "export",
    "convert": "convert",
    "plan": "plan",
    "serve": "serve",
}


_USER_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES, errno.EPERM, errno.EROFS,
                errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR, errno.EISDIR, errno.ENOENT,
                errno.EEXIST, errno.ENXIO, errno.ENODEV}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matformer",
        description="Elastic nested transformers: train one model, run or extract any width of it.",
    )
    parser.add_argument("--version", action="version", version=f"matformer {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, mod_name in VERBS.items():
        try:
            mod = importlib.import_module(f"matformer.cli.{mod_name}")
        except ModuleNotFoundError as e:
            if e.name == f"matformer.cli.{mod_name}":
                continue
            raise
        doc = (mod.__doc__ or "").strip().splitlines()
        p = sub.add_parser(verb, help=doc[0] if doc else None,
                           description=(mod.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except MatFormerError as e:
        print(f"matformer {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"matformer {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        # The OS refusing a path the user gave (a name too long, a loop of links, permissions,
        # a read-only or full disk) is bad input, not a bug: one line naming the path.
        if e.errno not in _USER_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"matformer {args.verb}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2

