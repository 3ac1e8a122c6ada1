"""Generate text from a checkpoint at any width, optionally with speculative decoding.

CKPT is a checkpoint folder, a .safetensors file, a Hub repo id (org/name[@revision]) or a
multi-tier repo written by `matformer slice --tiers` (with --tier: the folder holding that tier).
The prompt comes from --prompt or stdin and is tokenized with the checkpoint's tokenizer.json;
the text streams to stdout as it is decoded, and decoding stops at the end-of-text token or
after --max-new-tokens. Temperature 0 (the default) is greedy. --draft-tier T drafts tokens at
tier T of the same model and verifies them at the target width in one forward (the output is
the target width's output; with greedy decoding, token for token). A summary goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import ConfigError, DataError
from ..io.source import Source, resolve_source
from ..tiers import parse_int_list
from . import draft_tokens_arg
from .report import format_generation_summary

if TYPE_CHECKING:
    from ..generation import GenerationOutput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT",
                        help="checkpoint folder (with tokenizer.json), .safetensors file, org/name "
                        "or multi-tier repo")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--prompt", default=None, help="the prompt text (default: read stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens")
    width = parser.add_argument_group("width (default: the width the checkpoint stores)")
    width.add_argument("--tier", type=int, default=None, help="run at tier T (width = base >> T); of a multi-tier repo, the folder "
                       "that holds it")
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
    ws = parse_int_list(text, what)
    return ws[0] if len(ws) == 1 else ws


class TextStream:
    """Prints decoded text as tokens arrive. Decodes the whole output each time and prints the
    new suffix: byte-level BPE tokens can split a UTF-8 character, so a trailing replacement
    character is held back until the next token completes it."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tok = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, new: list[int]) -> None:
        self.ids.extend(new)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def generate_text(
    ckpt: str | Source,
    prompt: str,
    max_new_tokens: int = 128,
    *,
    tier: int | None = None,
    widths: int | Sequence[int] | None = None,
    draft_tier: int | None = None,
    draft_widths: int | Sequence[int] | None = None,
    draft_tokens: int | str = 4,
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    out: TextIO | None = None,
    **sampling: Any,
) -> GenerationOutput:
    """Resolve `ckpt`, load its tokenizer and model, decode after `prompt` and stream the text to
    `out` (default stdout); speculative when a draft width is given. `sampling`: temperature,
    top_k, top_p, seed. Returns the output with `extra["text"]` and `extra["base_width"]`."""
    from ..data import load_tokenizer  # numpy, tokenizers: only when a command runs
    from ..generation import generate, speculative_generate  # torch
    from ..io.checkpoint import load_model

    if not prompt or not prompt.strip():
        raise DataError("the prompt is empty; pass --prompt TEXT or pipe text on stdin")
    if tier is not None and widths is not None:
        raise ConfigError("give --tier or --widths, not both")
    if draft_tier is not None and draft_widths is not None:
        raise ConfigError("give --draft-tier or --draft-widths, not both")
    source = resolve_source(ckpt, tier=tier, widths=widths, revision=revision, companions=True)
    # The tokenizer first: a missing one fails before any weights are read.
    tok = load_tokenizer(source.folder)
    model = load_model(source, tier=tier, widths=widths, dtype=dtype, device=device).eval()
    ids = tok.encode(prompt).ids
    if not ids:
        raise DataError("the prompt is empty after tokenization; give some text")
    stream = TextStream(tok, out or sys.stdout)
    if draft_tier is not None or draft_widths is not None:
        result = speculative_generate(model, ids, max_new_tokens, draft_tier=draft_tier,
                                      draft_widths=draft_widths, draft_tokens=draft_tokens,
                                      stream=stream, **sampling)
    else:
        result = generate(model, ids, max_new_tokens, stream=stream, **sampling)
    stream.finish()
    result.extra["text"] = tok.decode(result.tokens, skip_special_tokens=True)
    result.extra["base_width"] = model.base_width
    return result


def run(args: argparse.Namespace) -> int:
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
        revision=args.revision, device=args.device, dtype=args.dtype,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    print(format_generation_summary(result, result.extra["base_width"]), file=sys.stderr)
    return 0
