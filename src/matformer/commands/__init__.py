"""One module per CLI verb: `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse


def draft_tokens_arg(text: str) -> int | str:
    """argparse type of --draft-tokens: a positive integer or 'adaptive'."""
    if text == "adaptive":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'adaptive', got {text!r}")
    return value
