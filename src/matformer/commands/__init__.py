"""One module per CLI verb: `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse


def draft_tokens_arg(text: str) -> int | str:
    """argparse type of --draft-tokens: a positive integer, 'adaptive' or 'auto'."""
    if text in ("adaptive", "auto"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, 'adaptive' or 'auto', got {text!r}")
    return value


def draft_tier_arg(text: str) -> int | str:
    """argparse type of --draft-tier: a tier (non-negative integer) or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a tier (0, 1, ...) or 'auto', got {text!r}")
    return value
