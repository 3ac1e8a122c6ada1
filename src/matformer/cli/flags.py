"""One module per CLI verb: `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from matformer.errors import ConfigError, TierError
from matformer.tiers import WidthRequest, parse_int_list


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


def check_report_paths(json_out: str | None, plot: str | None, protect: Sequence[Any]) -> None:
    """Before an evaluation runs: --json-out and --plot must be writable by the rule of
    `io.outputs` (not a file the command reads, a regular file, an existing folder) and not the
    same file; a one-line ConfigError otherwise."""
    from matformer.io.outputs import check_output

    if plot is not None and not str(plot).lower().endswith(".png"):
        raise ConfigError(f"--plot takes a .png file name, got {plot!r}")
    real = []
    for path, what in ((json_out, "JSON report"), (plot, "plot")):
        if path is not None and path != "-":
            real.append(check_output(path, protect=protect, what=what))
    if len(real) == 2 and real[0] == real[1]:
        raise ConfigError(f"--json-out and --plot name the same file {json_out!r}; give two")


def write_report(path: str, text: str, protect: Sequence[Any]) -> None:
    """--json-out: write `text` by the rule of `io.outputs` (one-line errors, nothing left)."""
    from matformer.io.outputs import write_output

    write_output(path, text, protect=protect, what="JSON report")


def write_plot(plot: Callable[..., Any], report: Any, path: str, title: str,
               protect: Sequence[Any] = ()) -> None:
    """--plot: draw `report` with `plot(report, tmp, title=...)` into a temporary PNG that
    replaces `path` when complete (`io.outputs`); a path that cannot be written is a one-line
    ConfigError."""
    from matformer.io.outputs import output_temp

    with output_temp(path, protect=protect, what="plot", suffix=".png") as tmp:
        plot(report, tmp, title=title)


# ---- the width flags: one generator for every verb that takes a width -------------------------


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}{name}"


def _dest(prefix: str, name: str) -> str:
    return (prefix + name).replace("-", "_")


def add_width_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "",
                    *, several: bool = False, what: str = "run"
                    ) -> argparse._ActionsContainer:
    """The five width flags `--{prefix}tier --{prefix}layer-tiers --{prefix}widths` (one of
    them: the FFN axis) and `--{prefix}kv-heads --{prefix}layer-kv-heads` (one of them: the
    head axis); `width_request(args, prefix)` reads them back as one `WidthRequest`.

    `prefix="draft-"` gives the draft's flags (`--draft-tier` also takes 'auto'). `several`
    (eval's old spellings, kept working): `--widths` and `--layer-kv-heads` may be repeated and
    `--kv-heads` may be a comma list, and the flags do not exclude each other (each names one
more point); `width_request` then refuses more than one setting.
    `what` completes the help ("run", "draft", "keep", ...). Returns the FFN axis's group (slice
    adds --budget and --tiers to it)."""
    # eval's points add up (a tier and a width list, counts and per-layer lists): no exclusion
    ffn = parser if several else parser.add_mutually_exclusive_group()
    if prefix == "draft-":
        ffn.add_argument(_flag(prefix, "tier"), type=draft_tier_arg, default=None, metavar="T",
                         help=f"{what} at tier T (FFN width B >> T in every layer); 'auto': the "
                         "tier and draft length of the highest expected tokens/s from costs "
                         "timed here")
    else:
        ffn.add_argument(_flag(prefix, "tier"), type=int, default=None, metavar="T",
                         help=f"{what} at tier T: FFN width B >> T in every layer (B = the base "
                         "width); of a multi-tier repo, the folder that holds it")
    ffn.add_argument(_flag(prefix, "layer-tiers"), default=None, metavar="T1,T2,...",
                     help=f"{what} at one tier per layer, e.g. 3,3,2,2,1,1")
    ffn.add_argument(_flag(prefix, "widths"), default=None, metavar="W1,W2,...",
                     action="append" if several else "store",
                     help=f"{what} at these FFN widths, one per layer (one number: the same "
                     "width everywhere)" + ("; repeatable: each list is one more point" if
                                            several else ""))
    heads = parser if several else parser.add_mutually_exclusive_group()
    heads.add_argument(_flag(prefix, "kv-heads"), type=str if several else int, default=None,
                       metavar="G",
                       help=f"{what} with the first G KV heads (and their query heads) in every "
                       "layer" + ("; the old spelling G1,G2,... is the same as --kv-heads-list"
                                  if several else ""))
    heads.add_argument(_flag(prefix, "layer-kv-heads"), default=None, metavar="G1,G2,...",
                       action="append" if several else "store",
                       help=f"{what} with these KV heads per layer"
                       + ("; repeatable: each list is one more point" if several else ""))
    return ffn


def int_list(text: str | None, flag: str) -> list[int] | None:
    """A comma-separated flag value as integers; None when the flag was not given (or empty)."""
    return parse_int_list(text, flag) if text else None


def _widths_value(text: str, flag: str) -> int | list[int]:
    """--widths: one number is that width in every layer (an int), several one per layer."""
    wl = parse_int_list(text, flag)
    if not wl:
        raise TierError(f"{flag} must list at least one width, e.g. {flag} 256")
    return wl[0] if len(wl) == 1 else wl


def width_request(args: argparse.Namespace, prefix: str = "") -> WidthRequest:
    """The five width flags of `prefix` (see `add_width_flags`) as one `WidthRequest`; a
    `--draft-tier auto` leaves the tier out (the caller reads `args.draft_tier` for it)."""
    def get(name: str) -> Any:
        return getattr(args, _dest(prefix, name), None)

    def one(name: str) -> Any:
        value = get(name)
        if isinstance(value, list):  # a repeatable flag (eval): one setting here
            if len(value) > 1:
                raise ConfigError(f"{_flag(prefix, name)} is given {len(value)} times; give it "
                                  f"once")
            value = value[0]
        return value

    tier = get("tier")
    widths, layer_tiers, layer_kv_heads = one("widths"), one("layer-tiers"), one("layer-kv-heads")
    kv_heads = get("kv-heads")
    if isinstance(kv_heads, str):  # eval's --kv-heads (a list is its old spelling)
        counts = parse_int_list(kv_heads, _flag(prefix, "kv-heads"))
        if len(counts) != 1:
            raise ConfigError(f"{_flag(prefix, 'kv-heads')} takes one head count here, got "
                              f"{kv_heads!r}")
        kv_heads = counts[0]
    return WidthRequest(
        tier=None if tier == "auto" else tier,
        layer_tiers=int_list(layer_tiers, _flag(prefix, "layer-tiers")),
        widths=None if widths is None else _widths_value(widths, _flag(prefix, "widths")),
        kv_heads=kv_heads,
        layer_kv_heads=int_list(layer_kv_heads, _flag(prefix, "layer-kv-heads")))
