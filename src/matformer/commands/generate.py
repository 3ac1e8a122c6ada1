"""Generate text from a checkpoint at any width, optionally with speculative decoding.

The prompt comes from --prompt or stdin and is tokenized with the checkpoint's tokenizer.json;
the text streams to stdout as it is decoded, and decoding stops at the end-of-text token or
after --max-new-tokens. Temperature 0 (the default) is greedy. --draft-tier T drafts tokens at
tier T of the same model and verifies them at the target width in one forward (the output is
the target width's output; with greedy decoding, token for token). A summary goes to stderr.
"""

from __future__ import annotations

import argparse

from . import draft_tokens_arg
from .report import format_generation_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (with tokenizer.json) or org/name")
    parser.add_argument("--prompt", default=None, help="the prompt text (default: read stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens")
    width = parser.add_argument_group("width (default: the width the checkpoint stores)")
    width.add_argument("--tier", type=int, default=None, help="run at tier T (width = base >> T)")
    width.add_argument("--widths", default=None,
                       help="per-layer FFN widths, comma-separated (or one width for all layers)")
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--draft-tier", type=int, default=None, help="draft at tier T of the same model")
    spec.add_argument("--draft-widths", default=None, help="draft at these per-layer widths")
    spec.add_argument("--draft-tokens", type=draft_tokens_arg, default=4,
                      help="tokens drafted per verification, or 'adaptive' (default 4)")
    samp = parser.add_argument_group("sampling")
    samp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    samp.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    samp.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    samp.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="compute dtype (default: as stored)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is steadier on a busy machine)")


def _widths(text: str | None, what: str) -> list[int] | int | None:
    if text is None:
        return None
    from matformer.tiers import parse_int_list

    ws = parse_int_list(text, what)
    return ws[0] if len(ws) == 1 else ws


def run(args: argparse.Namespace) -> int:
    import sys

    from matformer.errors import DataError
    from matformer.generation import generate_text

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise DataError("no prompt: pass --prompt TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    result = generate_text(
        args.ckpt, prompt, args.max_new_tokens, tier=args.tier,
        widths=_widths(args.widths, "--widths"), draft_tier=args.draft_tier,
        draft_widths=_widths(args.draft_widths, "--draft-widths"), draft_tokens=args.draft_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        device=args.device, dtype=args.dtype,
    )
    print(format_generation_summary(result, result.extra["base_width"]), file=sys.stderr)
    return 0
