"""Text in, text out: decode a checkpoint's completion of a prompt as text, and the lines that
describe what decoding did.

`generate_text(ckpt, prompt, ...)` resolves a checkpoint (folder, file, Hub id, multi-tier
repo), loads its tokenizer and model, decodes (plainly, speculatively, or a batch of prompts)
and streams the text to a file. `format_generation_summary`, `format_batch_summary` and
`format_draft_choice` are the summary lines `matformer generate` prints: the library returns
data (`GenerationOutput`), these turn it into text. (This module imports torch: the command
line imports it when `matformer generate` runs, not at start-up.)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

import torch

from matformer.data.text import load_tokenizer
from matformer.data.tokenizer_files import stop_ids
from matformer.data.vocabulary import difference
from matformer.errors import ConfigError, DataError
from matformer.inference.chat import chat_prompt, user_turn
from matformer.inference.decode import generate, generate_batch
from matformer.inference.sampling import GenerationOutput
from matformer.inference.speculative import DecodeCosts, DraftChoice, speculative_generate
from matformer.io.checkpoint import load_model
from matformer.io.files import read_bytes
from matformer.io.source import Source, resolve_source
from matformer.tiers import WidthRequest, describe_widths


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
    layer_tiers: Sequence[int] | None = None,
    widths: int | Sequence[int] | None = None,
    kv_heads: int | None = None,
    layer_kv_heads: Sequence[int] | None = None,
    draft_tier: int | str | None = None,
    draft_layer_tiers: Sequence[int] | None = None,
    draft_widths: int | Sequence[int] | None = None,
    draft_kv_heads: int | None = None,
    draft_layer_kv_heads: Sequence[int] | None = None,
    draft_tokens: int | str | None = None,
    draft_model: str | None = None,
    compile: bool = False,
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    out: TextIO | None = None,
    chat: bool = False,
    system: str | None = None,
    **sampling: Any,
) -> GenerationOutput | list[GenerationOutput]:
    """Resolve `ckpt`, load its tokenizer and model, decode after `prompt` and stream the text to
    `out` (default stdout); speculative when a draft is given. A list of prompts decodes them in
    one batch and prints one completion per line (returns one output per prompt). Target width:
    `tier`/`layer_tiers`/`widths` and `kv_heads`/`layer_kv_heads`; the draft's: the same five
    with `draft_` (`draft_tier="auto"`: chosen from measured costs) or `draft_model` (a
    checkpoint). `chat`: each prompt is a user message (after `system`, if given) rendered with
    the tokenizer's chat template (`inference.chat`), and the reply stops at the template's
    end-of-turn token; otherwise the prompt is plain text. Either way decoding stops at the
    tokenizer's and generation_config.json's EOS ids too. `sampling`: temperature, top_k, top_p,
    seed. Outputs carry `extra["text"]` and `extra["base_width"]`."""
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not texts or any(not t or not t.strip() for t in texts):
        raise DataError("the prompt is empty; pass --prompt TEXT or pipe text on stdin")
    target = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths, kv_heads=kv_heads,
                          layer_kv_heads=layer_kv_heads)
    auto = draft_tier == "auto"
    draft = WidthRequest(tier=None if auto else draft_tier,  # type: ignore[arg-type]
                         layer_tiers=draft_layer_tiers, widths=draft_widths,
                         kv_heads=draft_kv_heads, layer_kv_heads=draft_layer_kv_heads)
    if draft_model is not None and (auto or draft.names_ffn):
        raise ConfigError("give --draft-model or a draft width, not both")
    if auto and draft.names_ffn:
        raise ConfigError("give --draft-tier auto or a draft width, not both")
    speculative = auto or bool(draft) or draft_model is not None
    if system is not None and not chat:
        raise ConfigError("a system message needs --chat")
    if not isinstance(prompt, str) and speculative:
        raise ConfigError("--prompts-file decodes a batch without speculative decoding; drop "
                          "the draft flags")
    return _generate_text(ckpt, texts, not isinstance(prompt, str), max_new_tokens, target,
                          draft if speculative else None, auto, draft_tokens, draft_model,
                          compile=compile, revision=revision, device=device, dtype=dtype,
                          out=out or sys.stdout, sampling=sampling,
                          chat=(system,) if chat else None)


def _generate_text(ckpt: str | Source, texts: list[str], batch: bool, max_new_tokens: int,
                   target: WidthRequest, draft: WidthRequest | None, auto: bool,
                   draft_tokens: int | str | None, draft_model: str | None, *, compile: bool,
                   revision: str | None, device: str | None, dtype: str | None, out: TextIO,
                   sampling: dict[str, Any], chat: tuple[str | None] | None = None
                   ) -> GenerationOutput | list[GenerationOutput]:
    """`generate_text` with the target's and the draft's widths as one request each (`draft`
    None: plain decoding; `chat`: (system message,) to render prompts as chat turns)."""
    source = resolve_source(ckpt, request=target, revision=revision, companions=True)
    # The tokenizer (and the chat template) first: a missing one fails before any weights are read.
    tok = load_tokenizer(source.folder)
    config_eos = source.config.eos_token_id
    if chat is not None:
        prompts = [chat_prompt(tok, user_turn(t, chat[0]), config_eos=config_eos,
                               where=source.describe()) for t in texts]
        ids, stop = [p.ids for p in prompts], prompts[0].stop
    else:
        ids, stop = [tok.encode(t).ids for t in texts], stop_ids(tok, config_eos)
    sampling = {**sampling, "eos_token_id": stop or None}
    model = load_model(source, dtype=dtype, device=device, **target.keywords()).eval()
    if not all(ids):
        raise DataError("a prompt is empty after tokenization; give some text")
    if not all_finite(model):
        print(f"warning: {source.describe()} has non-finite weights (NaN or inf); what it "
              f"generates is meaningless", file=sys.stderr)
    if batch:
        results = generate_batch(model, ids, max_new_tokens, compile=compile, **sampling)
        write_batch(tok, results, out)
    else:
        stream = TextStream(tok, out)
        if draft is not None:
            drafter = (load_draft_model(draft_model, tok, dtype, device, revision)
                       if draft_model else None)
            keywords = {f"draft_{k}": v for k, v in draft.keywords().items()}
            results = [speculative_generate(
                model, ids[0], max_new_tokens, draft_tier="auto" if auto else draft.tier,
                **{k: v for k, v in keywords.items() if k != "draft_tier"},
                draft_tokens=draft_tokens, draft_model=drafter, compile=compile, stream=stream,
                **sampling)]
        else:
            results = [generate(model, ids[0], max_new_tokens, stream=stream, compile=compile,
                                **sampling)]
        stream.finish()
    for r in results:
        r.extra["text"] = tok.decode(r.tokens, skip_special_tokens=True)
        r.extra["base_width"] = model.base_width
    return results if batch else results[0]


def load_draft_model(ckpt: str, tok: Any, dtype: str | None, device: str | None,
                     revision: str | None) -> Any:
    """A draft checkpoint, loaded at its stored width; its tokenizer must be the target's
    `tok` (token ids are exchanged between the two)."""
    source = resolve_source(ckpt, revision=revision, companions=True)
    if (source.folder / "tokenizer.json").is_file():
        why = difference(load_tokenizer(source.folder), tok)  # by content, not bytes
        if why is not None:
            raise ConfigError(f"{ckpt}: the draft model's tokenizer differs from the "
                              f"target's ({why}); draft with a model of the same tokenizer")
    return load_model(source, dtype=dtype, device=device).eval()


def write_batch(tok: Any, results: list[GenerationOutput], out: TextIO) -> None:
    """One completion per line, a newline (and a backslash) inside it escaped."""
    for r in results:
        text = tok.decode(r.tokens, skip_special_tokens=True)
        out.write(text.replace("\\", "\\\\").replace("\n", "\\n") + "\n")
    out.flush()


def read_prompts(path: str) -> list[str]:
    """The prompts of a UTF-8 text file, one per line (blank lines skipped)."""
    # a regular file of at most 256 MB: a FIFO or device is refused, never waited on
    raw = read_bytes(path, limit=256_000_000, error=DataError, shown=path)
    try:
        lines = [line.rstrip("\r") for line in raw.decode("utf-8").split("\n")]
    except UnicodeDecodeError:
        raise DataError(f"{path}: the prompts file is not UTF-8 text; save it as UTF-8") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (one per line; blank lines are skipped)")
    return prompts


def all_finite(model: Any) -> bool:
    """Whether every floating-point weight of `model` is finite (a diverged checkpoint is not)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())


# ---- the summary lines ------------------------------------------------------------------------


def format_generation_summary(output: GenerationOutput, base_width: int) -> str:
    """The one-line summary `matformer generate` prints to stderr after the text."""
    s = output.stats
    msg = (f"[{s.new_tokens} tokens in {s.seconds:.2f}s, {s.tokens_per_s:.1f} tok/s at "
           f"{describe_widths(base_width, output.widths)}; stopped by {s.stop_reason}")
    if output.draft_widths is not None:
        msg += (f"; draft {describe_widths(base_width, output.draft_widths)}: accepted "
                f"{s.accepted}/{s.drafted} ({100 * s.acceptance_rate:.0f}%)")
    if "choice" in output.extra:
        msg += "; " + format_draft_choice(output.extra["choice"], output.extra.get("costs"))
    if "compile" in output.extra:
        msg += "; " + output.extra["compile"].describe()
    return msg + "]"


def format_draft_choice(choice: DraftChoice, costs: DecodeCosts | None) -> str:
    """The (draft, k) speculative decoding chose and the measured costs it chose them from
    (None: chosen without timing anything, e.g. plain decoding from the probe's bound)."""
    if costs is None:
        return f"chose plain decoding ({choice.reason or 'no draft expected to pay'})"
    verify = ", ".join(f"{k}: {1e3 * t:.2f}" for k, t in sorted(costs.verify.items()))
    drafts = ", ".join(f"{n}: {1e3 * t:.2f}" for n, t in costs.draft_steps.items())
    why = choice.reason or "no draft expected to pay"
    pick = (f"plain decoding ({why})" if choice.draft is None
            else f"{choice.draft}, k={choice.k} (acceptance {100 * choice.acceptance:.0f}%, "
                 f"expected {choice.expected_speedup:.2f}x)")
    return (f"chose {pick} from costs measured here in {1e3 * costs.seconds:.0f} ms, in ms: "
            f"plain step {1e3 * costs.plain:.2f}; target step {1e3 * costs.target_step:.2f}; "
            f"draft steps {drafts}; verify of k+1 tokens {verify}")


def format_batch_summary(outputs: list[GenerationOutput], base_width: int) -> str:
    """The summary `matformer generate --prompts-file` prints to stderr."""
    s = outputs[0].stats
    n = sum(o.stats.new_tokens for o in outputs)
    rate = n / s.seconds if s.seconds > 0 else 0.0
    compiled = ("; " + outputs[0].extra["compile"].describe()
                if "compile" in outputs[0].extra else "")
    return (f"[{len(outputs)} prompts, {n} tokens in {s.seconds:.2f}s, {rate:.1f} tok/s in all, "
            f"at {describe_widths(base_width, outputs[0].widths)}{compiled}]")
