"""Generate text from a checkpoint at any width, optionally with speculative decoding.

CKPT is a checkpoint folder, a .safetensors file, a Hub repo id (org/name[@revision]) or a
multi-tier repo written by `matformer slice --tiers` (with --tier: the folder holding that tier).
The prompt comes from --prompt or stdin and is tokenized with the checkpoint's tokenizer.json;
the text streams to stdout as it is decoded, and decoding stops at the end-of-text token or
after --max-new-tokens. Temperature 0 (the default) is greedy. The width flags are every
verb's: --tier, --layer-tiers or --widths (FFN), --kv-heads or --layer-kv-heads (the second
elastic axis, attention heads); the same five with --draft- choose the draft. --draft-tier T
drafts tokens at tier T of the same model and verifies them at the target width in one forward
(the output is the target width's output; with greedy decoding, token for token);
--draft-kv-heads G alone drafts with fewer heads than the target at its FFN widths.
--draft-tier auto times the draft steps and verifies on this machine and picks the
(draft tier, k) of the highest expected tokens/s; --draft-model CKPT drafts with a separate
model of the same tokenizer. --compile runs the compiled static-cache decode step (CUDA graphs
on a GPU). --prompts-file FILE decodes every line of FILE as a prompt, in one batch, and prints
one completion per line (a newline inside a completion written as \\n). A summary goes to
stderr. --chat "MESSAGE" (or --chat with --prompt / --prompts-file / stdin) sends the text as
a user message through the tokenizer's chat template (after --system TEXT, if given) and stops
the reply at the template's end-of-turn token or generation_config.json's EOS ids. This verb
parses flags; the library behind it is `matformer.inference.text` (`inference.chat`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from matformer.cli.flags import (
    add_checkpoint_argument,
    add_width_flags,
    check_device,
    draft_tokens_arg,
    set_threads,
    width_request,
)
from matformer.errors import ConfigError, DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--prompt", default=None, help="the prompt text (default: read stdin)")
    parser.add_argument("--chat", nargs="?", const=True, default=None, metavar="MESSAGE",
                        help="chat: the prompt (MESSAGE, --prompt, each line of --prompts-file "
                        "or stdin) is a user message rendered with the tokenizer's chat "
                        "template; the reply stops at its end-of-turn token")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="--chat: a system message before the user's (default: the "
                        "template's own, if any)")
    parser.add_argument("--prompts-file", default=None, metavar="FILE",
                        help="decode every line of FILE as a prompt, in one batch")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (static KV cache; CUDA graphs on a "
                        "GPU); the first call at a width compiles")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens")
    width = parser.add_argument_group("width (default: the width the checkpoint stores)")
    add_width_flags(width)
    spec = parser.add_argument_group("speculative decoding")
    add_width_flags(spec, "draft-", what="draft")
    spec.add_argument("--draft-model", default=None, metavar="CKPT",
                      help="draft with this separate model (same tokenizer), at its stored width")
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


def run(args: argparse.Namespace) -> int:
    from matformer.inference.text import (  # torch: imported only when the verb runs
        format_batch_summary,
        format_generation_summary,
        generate_text,
        read_prompts,
    )

    set_threads(args.threads)
    check_device(args.device)
    check_sampling(args.temperature, args.seed)
    if isinstance(args.chat, str):  # --chat "MESSAGE"
        if args.prompt is not None or args.prompts_file is not None:
            raise ConfigError("give the message as --chat MESSAGE or --prompt, not both")
        args.prompt = args.chat
    if args.system is not None and args.chat is None:
        raise ConfigError("--system needs --chat")
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise ConfigError("give --prompt or --prompts-file, not both")
        prompt: str | list[str] = read_prompts(args.prompts_file)
    elif args.prompt is not None:
        prompt = check_utf8(args.prompt, "--prompt")
    else:
        prompt = read_stdin_prompt()
    if args.compile:
        from matformer.inference.compile_cache import compile_cache_dir

        print(f"--compile: the decode step compiles on its first use at a width, or on a CPU "
              f"with one thread runs as one C++ call (built once; kernels kept in "
              f"{compile_cache_dir()} for later runs)", file=sys.stderr)
    draft = {f"draft_{k}": v for k, v in width_request(args, "draft-").keywords().items()}
    if args.draft_tier == "auto":
        draft["draft_tier"] = "auto"
    from matformer.evaluation.compile_clock import compile_seconds

    compiled_before = compile_seconds()
    result = generate_text(
        args.ckpt, prompt, args.max_new_tokens, **width_request(args).keywords(), **draft,
        draft_tokens=args.draft_tokens, draft_model=args.draft_model, compile=args.compile,
        revision=args.revision, device=args.device, dtype=args.dtype,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        chat=args.chat is not None, system=args.system,
    )
    if isinstance(result, list):
        print(format_batch_summary(result, result[0].extra["base_width"]), file=sys.stderr)
    else:
        print(format_generation_summary(result, result.extra["base_width"]), file=sys.stderr)
    if args.compile:
        print(compile_report(compile_seconds() - compiled_before,
                             result if isinstance(result, list) else [result]), file=sys.stderr)
    return 0


def compile_report(seconds: float, outputs: list[Any]) -> str:
    """--compile: the compile time, and the decoding speed without it (the summary's tokens/s
    includes the first call's compilation)."""
    new = sum(o.stats.new_tokens for o in outputs)
    wall = max(o.stats.seconds for o in outputs)  # a batch decodes together
    rest = wall - seconds
    speed = f"{new / rest:.1f} tokens/s" if rest > 0 and new else "n/a"
    return f"compiled in {seconds:.1f} s; decoding without the compilation: {speed}"
