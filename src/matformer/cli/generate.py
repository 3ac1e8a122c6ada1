"""Generate text from a checkpoint at any width, optionally with speculative decoding.

CKPT is a checkpoint folder, a .safetensors file, a Hub repo id (org/name[@revision]) or a
multi-tier repo written by `matformer slice --tiers` (with --tier: the folder holding that tier).
The prompt comes from --prompt or stdin and is tokenized with the checkpoint's tokenizer.json;
the text streams to stdout as it is decoded, and decoding stops at the end-of-text token or
after --max-new-tokens. Temperature 0 (the default) is greedy. --draft-tier T drafts tokens at
tier T of the same model and verifies them at the target width in one forward (the output is
the target width's output; with greedy decoding, token for token). --kv-heads G runs the first
G KV heads (the second elastic axis); --draft-kv-heads G drafts with fewer heads than the
target. --draft-tier auto times the draft steps and verifies on this machine and picks the
(draft tier, k) of the highest expected tokens/s; --draft-model CKPT drafts with a separate
model of the same tokenizer. --compile runs the compiled static-cache decode step (CUDA graphs
on a GPU). --prompts-file FILE decodes every line of FILE as a prompt, in one batch, and prints
one completion per line (a newline inside a completion written as \\n). A summary goes to
stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from matformer.cli.flags import (
    add_checkpoint_argument,
    check_device,
    draft_tier_arg,
    draft_tokens_arg,
    set_threads,
)
from matformer.errors import ConfigError, DataError
from matformer.evaluation.report import format_batch_summary, format_generation_summary
from matformer.io.source import Source, resolve_source
from matformer.tiers import parse_int_list

if TYPE_CHECKING:
    from matformer.inference.decode import GenerationOutput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--prompt", default=None, help="the prompt text (default: read stdin)")
    parser.add_argument("--prompts-file", default=None, metavar="FILE",
                        help="decode every line of FILE as a prompt, in one batch")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (static KV cache; CUDA graphs on a "
                        "GPU); the first call at a width compiles")
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
    spec.add_argument("--draft-tier", type=draft_tier_arg, default=None,
                      help="draft at tier T of the same model; 'auto': the tier and draft "
                      "length of the highest expected tokens/s from costs timed here")
    spec.add_argument("--draft-model", default=None, metavar="CKPT",
                      help="draft with this separate model (same tokenizer), at its stored width")
    spec.add_argument("--draft-widths", default=None, help="draft at these per-layer widths")
    spec.add_argument("--draft-kv-heads", type=int, default=None, metavar="G",
                      help="draft with the first G KV heads (at most the target's; alone: the "
                      "target's FFN widths)")
    spec.add_argument("--draft-layer-kv-heads", default=None, metavar="G1,G2,...",
                      help="draft with these KV heads per layer")
    spec.add_argument("--draft-tokens", type=draft_tokens_arg, default=None,
                      help="tokens drafted per verification, 'adaptive', or 'auto' (from the "
                      "measured costs; the default with --draft-tier auto, else 4)")
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
    prompt: str | Sequence[str],
    max_new_tokens: int = 128,
    *,
    tier: int | None = None,
    widths: int | Sequence[int] | None = None,
    draft_tier: int | str | None = None,
    draft_widths: int | Sequence[int] | None = None,
    draft_tokens: int | str | None = None,
    draft_model: str | None = None,
    kv_heads: int | None = None,
    layer_kv_heads: Sequence[int] | None = None,
    draft_kv_heads: int | None = None,
    draft_layer_kv_heads: Sequence[int] | None = None,
    compile: bool = False,
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    out: TextIO | None = None,
    **sampling: Any,
) -> GenerationOutput | list[GenerationOutput]:
    """Resolve `ckpt`, load its tokenizer and model, decode after `prompt` and stream the text to
    `out` (default stdout); speculative when a draft is given. A list of prompts decodes them in
    one batch and prints one completion per line (returns one output per prompt). `sampling`:
    temperature, top_k, top_p, seed. Outputs carry `extra["text"]` and `extra["base_width"]`."""
    from matformer.data.text import load_tokenizer  # numpy, tokenizers: only when a command runs
    from matformer.inference.decode import generate, generate_batch  # torch
    from matformer.inference.speculative import speculative_generate
    from matformer.io.checkpoint import load_model

    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not texts or any(not t or not t.strip() for t in texts):
        raise DataError("the prompt is empty; pass --prompt TEXT or pipe text on stdin")
    for a, b, flags in ((tier, widths, "--tier or --widths"),
                        (draft_tier, draft_widths, "--draft-tier or --draft-widths"),
                        (draft_model, draft_tier if draft_tier is not None else draft_widths,
                         "--draft-model or a draft width"),
                        (kv_heads, layer_kv_heads, "--kv-heads or --layer-kv-heads"),
                        (draft_kv_heads, draft_layer_kv_heads,
                         "--draft-kv-heads or --draft-layer-kv-heads")):
        if a is not None and b is not None:
            raise ConfigError(f"give {flags}, not both")
    source = resolve_source(ckpt, tier=tier, widths=widths, revision=revision, companions=True)
    # The tokenizer first: a missing one fails before any weights are read.
    tok = load_tokenizer(source.folder)
    model = load_model(source, tier=tier, widths=widths, dtype=dtype, device=device,
                       kv_heads=kv_heads, layer_kv_heads=layer_kv_heads).eval()
    ids = [tok.encode(t).ids for t in texts]
    if not all(ids):
        raise DataError("a prompt is empty after tokenization; give some text")
    if not _finite(model):
        print(f"warning: {source.describe()} has non-finite weights (NaN or inf); what it "
              f"generates is meaningless", file=sys.stderr)
    draft_heads = {"draft_kv_heads": draft_kv_heads, "draft_layer_kv_heads": draft_layer_kv_heads}
    speculative = any(v is not None for v in (draft_tier, draft_widths, draft_model,
                                              *draft_heads.values()))
    if not isinstance(prompt, str):
        if speculative:
            raise ConfigError("--prompts-file decodes a batch without speculative decoding; "
                              "drop the draft flags")
        results = generate_batch(model, ids, max_new_tokens, compile=compile, **sampling)
        _print_batch(tok, results, out or sys.stdout)
    else:
        stream = TextStream(tok, out or sys.stdout)
        if speculative:
            drafter = _draft_model(draft_model, tok, dtype, device, revision) if draft_model else None
            results = [speculative_generate(
                model, ids[0], max_new_tokens, draft_tier=draft_tier, draft_widths=draft_widths,
                draft_tokens=draft_tokens, draft_model=drafter, **draft_heads, compile=compile,
                stream=stream, **sampling)]
        else:
            results = [generate(model, ids[0], max_new_tokens, stream=stream, compile=compile,
                                **sampling)]
        stream.finish()
    for r in results:
        r.extra["text"] = tok.decode(r.tokens, skip_special_tokens=True)
        r.extra["base_width"] = model.base_width
    return results[0] if isinstance(prompt, str) else results


def _draft_model(ckpt: str, tok: Any, dtype: str | None, device: str | None,
                 revision: str | None) -> Any:
    """The --draft-model checkpoint, loaded at its stored width; its tokenizer must be the
    target's (token ids are exchanged between the two)."""
    from matformer.data.text import load_tokenizer
    from matformer.io.checkpoint import load_model

    source = resolve_source(ckpt, revision=revision, companions=True)
    if (source.folder / "tokenizer.json").is_file():
        if load_tokenizer(source.folder).to_str() != tok.to_str():
            raise ConfigError(f"{ckpt}: the draft model's tokenizer.json differs from the "
                              f"target's; draft with a model trained with the same tokenizer")
    return load_model(source, dtype=dtype, device=device).eval()


def _print_batch(tok: Any, results: list[GenerationOutput], out: TextIO) -> None:
    """One completion per line, a newline (and a backslash) inside it escaped."""
    for r in results:
        text = tok.decode(r.tokens, skip_special_tokens=True)
        out.write(text.replace("\\", "\\\\").replace("\n", "\\n") + "\n")
    out.flush()


def _read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except OSError as e:
        raise DataError(f"{path}: cannot read the prompts file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: the prompts file is not UTF-8 text; save it as UTF-8") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (one per line; blank lines are skipped)")
    return prompts


def read_stdin_prompt() -> str:
    """The prompt piped on stdin, which must be UTF-8 text."""
    if sys.stdin is None or sys.stdin.isatty():
        raise DataError("no prompt: pass --prompt TEXT or pipe text on stdin")
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"the prompt on stdin is not UTF-8 text (byte {e.start}); convert it to "
                        f"UTF-8") from None


def check_utf8(text: str, what: str) -> str:
    """argv bytes that are not UTF-8 arrive as lone surrogates: refuse them in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{what} is not UTF-8 text (character {e.start}); pass UTF-8") from None
    return text


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


def check_sampling(temperature: float, seed: int | None) -> None:
    """Temperatures that would overflow the logits (or are not numbers) and seeds torch cannot
    take are one-line errors."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise ConfigError(f"--temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                          f"{MAX_TEMPERATURE:g}, got {temperature!r}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ConfigError(f"--seed must be an integer in [0, 2^63), got {seed}")


def _finite(model: Any) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    check_device(args.device)
    check_sampling(args.temperature, args.seed)
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise ConfigError("give --prompt or --prompts-file, not both")
        prompt: str | list[str] = _read_prompts(args.prompts_file)
    elif args.prompt is not None:
        prompt = check_utf8(args.prompt, "--prompt")
    else:
        prompt = read_stdin_prompt()
    result = generate_text(
        args.ckpt, prompt, args.max_new_tokens, tier=args.tier,
        widths=_widths(args.widths, "--widths"), draft_tier=args.draft_tier,
        draft_widths=_widths(args.draft_widths, "--draft-widths"), draft_tokens=args.draft_tokens,
        draft_model=args.draft_model, compile=args.compile,
        kv_heads=args.kv_heads, draft_kv_heads=args.draft_kv_heads,
        layer_kv_heads=_heads(args.layer_kv_heads, "--layer-kv-heads"),
        draft_layer_kv_heads=_heads(args.draft_layer_kv_heads, "--draft-layer-kv-heads"),
        revision=args.revision, device=args.device, dtype=args.dtype,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    if isinstance(result, list):
        print(format_batch_summary(result, result[0].extra["base_width"]), file=sys.stderr)
    else:
        print(format_generation_summary(result, result.extra["base_width"]), file=sys.stderr)
    return 0
