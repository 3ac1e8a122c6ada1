"""One module per CLI verb: `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from matformer.errors import ConfigError, TierError
from matformer.tiers import parse_int_list


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


MAX_THREADS = 1024


def set_threads(threads: int | None) -> None:
    """--threads: None keeps torch's choice; otherwise a positive count."""
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:  # torch crashes (SIGSEGV) with ~100000 threads
        raise ConfigError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    import torch

    torch.set_num_threads(threads)


def check_device(device: str | None) -> None:
    """--device must name a device torch knows and this machine has (one-line errors)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device!r}: matformer runs on cpu, cuda or mps")


# ---- flags and helpers shared by the model verbs (generate, eval) ------------------------------


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """CKPT (any source kind) and --revision."""
    parser.add_argument("ckpt", metavar="CKPT",
                        help="checkpoint folder (with tokenizer.json), .safetensors file, org/name "
                        "or multi-tier repo")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")


def write_plot(plot: Callable[..., Any], report: Any, path: str, title: str) -> None:
    """--plot: draw `report` to `path` with `plot(report, path, title=...)`; a path that cannot
    be written is a one-line ConfigError."""
    try:
        plot(report, path, title=title)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the plot ({e.strerror or e}); choose another "
                          f"--plot") from None


# ---- the width and head flags of slice and export (and of slice's Gemma 3n half) ---------------


def add_width_flags(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """--tier / --widths / --layer-tiers, one of them; returns their group (slice adds more)."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--tier", type=int, metavar="T",
                      help="uniform tier: FFN width B >> T in every layer (B = the source's base)")
    what.add_argument("--widths", metavar="W1,W2,...",
                      help="FFN width per layer (one number: the same width everywhere)")
    what.add_argument("--layer-tiers", metavar="T1,T2,...", help="tier per layer, e.g. 3,3,2,2,1,1")
    return what


def add_head_flags(parser: argparse.ArgumentParser, layer_help: str = "KV heads kept per layer"
                   ) -> None:
    """--kv-heads / --layer-kv-heads, one of them."""
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--kv-heads", type=int, metavar="G",
                       help="keep the first G KV heads (and their query heads) in every layer")
    heads.add_argument("--layer-kv-heads", metavar="G1,G2,...", help=layer_help)


def int_list(text: str | None, flag: str) -> list[int] | None:
    """A comma-separated flag value as integers; None when the flag was not given (or empty)."""
    return parse_int_list(text, flag) if text else None


def width_request(args: argparse.Namespace) -> dict[str, Any]:
    """The width flags as the library's keywords `tier`, `widths` (one number: that width in
    every layer, passed as an int) and `layer_tiers`."""
    widths: int | list[int] | None = None
    if args.widths is not None:
        wl = parse_int_list(args.widths, "--widths")
        if not wl:
            raise TierError("--widths must list at least one width, e.g. --widths 256")
        widths = wl[0] if len(wl) == 1 else wl
    return {"tier": args.tier, "widths": widths,
            "layer_tiers": int_list(args.layer_tiers, "--layer-tiers")}


def head_request(args: argparse.Namespace) -> dict[str, Any]:
    """The head flags as the library's keywords `kv_heads` and `layer_kv_heads`."""
    return {"kv_heads": args.kv_heads,
            "layer_kv_heads": int_list(args.layer_kv_heads, "--layer-kv-heads")}
