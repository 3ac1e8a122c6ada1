"""Generate text from a checkpoint at any width, optionally with speculative decoding.

CKPT is a checkpoint folder, a .safetensors file, a Hub repo id (org/name[@revision]) or a
multi-tier repo written by `matformer slice --tiers` (with --tier: the folder holding that tier).
The prompt comes from --prompt or stdin and is tokenized with the checkpoint's tokenizer.json;
the text streams to stdout as it is decoded, and decoding stops at the end-of-text token or
after --max-new-tokens. Temperature 0 (the default) is greedy. --draft-tier T drafts tokens at
tier T of the same model and verifies them at the target width in one forward (the output is
the target width's output; with greedy decoding, token for token). --kv-heads G runs the first
G KV heads (the second elastic axis); --draft-kv-heads G drafts with fewer heads than the
target. A summary goes to stderr.
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
    width.add_argument("--kv-heads", type=int, default=None, metavar="G",
                       help="run the first G KV heads (and their query heads) of every layer")
    width.add_argument("--layer-kv-heads", default=None, metavar="G1,G2,...",
                       help="KV heads per layer")
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--draft-tier", type=int, default=None, help="draft at tier T of the same model")
    spec.add_argument("--draft-widths", default=None, help="draft at these per-layer widths")
    spec.add_argument("--draft-kv-heads", type=int, default=None, metavar="G",
                      help="draft with the first G KV heads (at most the target's; alone: the "
                      "target's FFN widths)")
    spec.add_argument("--draft-layer-kv-heads", default=None, metavar="G1,G2,...",
                      help="draft with these KV heads per layer")
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


def _heads(text: str | None, what: str) -> list[int] | None:
    return None if text is None else parse_int_list(text, what)


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
    kv_heads: int | None = None,
    layer_kv_heads: Sequence[int] | None = None,
    draft_kv_heads: int | None = None,
    draft_layer_kv_heads: Sequence[int] | None = None,
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
    if kv_heads is not None and layer_kv_heads is not None:
        raise ConfigError("give --kv-heads or --layer-kv-heads, not both")
    if draft_kv_heads is not None and draft_layer_kv_heads is not None:
        raise ConfigError("give --draft-kv-heads or --draft-layer-kv-heads, not both")
    source = resolve_source(ckpt, tier=tier, widths=widths, revision=revision, companions=True)
    # The tokenizer first: a missing one fails before any weights are read.
    tok = load_tokenizer(source.folder)
    model = load_model(source, tier=tier, widths=widths, dtype=dtype, device=device,
                       kv_heads=kv_heads, layer_kv_heads=layer_kv_heads).eval()
    ids = tok.encode(prompt).ids
    if not ids:
        raise DataError("the prompt is empty after tokenization; give some text")
    stream = TextStream(tok, out or sys.stdout)
    draft_heads = {"draft_kv_heads": draft_kv_heads, "draft_layer_kv_heads": draft_layer_kv_heads}
    if any(v is not None for v in (draft_tier, draft_widths, *draft_heads.values())):
        result = speculative_generate(model, ids, max_new_tokens, draft_tier=draft_tier,
                                      draft_widths=draft_widths, draft_tokens=draft_tokens,
                                      **draft_heads,
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
        kv_heads=args.kv_heads, draft_kv_heads=args.draft_kv_heads,
        layer_kv_heads=_heads(args.layer_kv_heads, "--layer-kv-heads"),
        draft_layer_kv_heads=_heads(args.draft_layer_kv_heads, "--draft-layer-kv-heads"),
        revision=args.revision, device=args.device, dtype=args.dtype,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    print(format_generation_summary(result, result.extra["base_width"]), file=sys.stderr)
    return 0
