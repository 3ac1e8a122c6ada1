"""Evaluate every width of one elastic model: loss, consistency with the full width, speed.

`evaluate(model_or_ckpt, data, ...)` runs each requested width (default: every tier the model can
run, a few Mix'n'Match mixes between neighbouring tiers, and any extra per-layer width lists) on
the same held-out windows and reports, per width:

- validation loss (mean natural-log next-token cross-entropy over every predicted token of the
  windows; exactly the mean of `model.loss` over the windows, which all have the same length)
  and perplexity = e^loss;
- non-embedding parameters at that width (the paper compares sizes by these);
- tokens/s of the evaluation forwards (batch of windows, no cache);
- consistency with the reference (the widest width the model stores, normally tier 0), on the
  same prefixes, over every position of every window:
    greedy_match = fraction of positions whose argmax token equals the reference's argmax;
    kl = KL(P_ref || P_width) = sum_v P_ref(v) (log P_ref(v) - log P_width(v)), nats per position
    (the direction the paper's soft consistency uses: how much the width loses of the full
    model's distribution);
- decoding tokens/s (greedy, batch 1, KV cache) on prompts cut from the data;
and a speculative decoding report: for each smaller tier (and each extra width list) as the
draft and the reference as the target, the acceptance rate of greedy drafts, the speed-up of
`speculative_generate` over plain `generate` at the reference width, and whether the output was
identical (it must be).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import perplexity
from .errors import ConfigError, DataError
from .generation import _sync, generate, speculative_generate
from .model import MatFormerLM, parameter_counts
from .tiers import available_tiers, describe_widths, uniform_tier


@dataclass
class WidthResult:
    name: str
    """'tier 2', or 'mix' + per-layer widths."""
    widths: list[int]
    kind: str
    """'tier' (a trained granularity), 'mix' (Mix'n'Match) or 'custom' (a requested list)."""
    tier: int | None
    non_embedding_params: int
    loss: float
    perplexity: float
    tokens_per_s: float
    greedy_match: float
    """Fraction of positions whose greedy token equals the reference width's."""
    kl_from_reference: float
    """KL(P_ref || P_width), nats per position."""
    decode_tokens_per_s: float | None = None


@dataclass
class SpeculativeResult:
    draft_name: str
    draft_widths: list[int]
    draft_tokens: int | str
    acceptance_rate: float
    accepted: int
    drafted: int
    plain_tokens_per_s: float
    speculative_tokens_per_s: float
    speedup: float
    identical: bool
    """Greedy speculative output equal, token for token, to plain decoding at the target."""
    new_tokens: int


@dataclass
class EvalReport:
    source: str
    data: str
    reference_widths: list[int]
    base_width: int
    seq_len: int
    windows: int
    tokens: int
    """Tokens predicted per width (windows x (seq_len - 1))."""
    device: str
    dtype: str
    results: list[WidthResult] = field(default_factory=list)
    speculative: list[SpeculativeResult] = field(default_factory=list)
    speculative_settings: dict[str, Any] = field(default_factory=dict)
    kl_direction: str = "KL(P_reference || P_width), nats per position"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A plain-text report (the CLI's default output)."""
        lines = [
            f"matformer eval: {self.source}",
            f"data: {self.data} — {self.windows} windows x {self.seq_len} tokens "
            f"({self.tokens} predicted tokens per width); device {self.device}, {self.dtype}",
            f"reference (full) width: {describe_widths(self.base_width, self.reference_widths)}; "
            f"consistency = greedy-token match and {self.kl_direction}",
            "",
        ]
        head = (f"{'width':<24} {'non-emb params':>14} {'loss':>7} {'ppl':>9} {'match%':>7} "
                f"{'KL':>8} {'eval tok/s':>11} {'decode tok/s':>12}")
        lines += [head, "-" * len(head)]
        for r in self.results:
            dec = f"{r.decode_tokens_per_s:12.1f}" if r.decode_tokens_per_s is not None else f"{'-':>12}"
            lines.append(
                f"{_short_name(r):<24} {_fmt_count(r.non_embedding_params):>14} {r.loss:7.4f} "
                f"{r.perplexity:9.2f} {100 * r.greedy_match:7.2f} {r.kl_from_reference:8.4f} "
                f"{r.tokens_per_s:11.0f} {dec}"
            )
        if self.speculative:
            s = self.speculative_settings
            lines += [
                "",
                f"speculative decoding (greedy, target = reference width, shared KV cache; "
                f"{s.get('prompts')} prompts x {s.get('prompt_len')} tokens, "
                f"{s.get('new_tokens')} new tokens each, draft_tokens={s.get('draft_tokens')})",
            ]
            head = (f"{'draft':<24} {'accept%':>8} {'plain tok/s':>12} {'spec tok/s':>11} "
                    f"{'speed-up':>9} {'identical':>9}")
            lines += [head, "-" * len(head)]
            for sp in self.speculative:
                lines.append(
                    f"{sp.draft_name[:24]:<24} {100 * sp.acceptance_rate:8.1f} "
                    f"{sp.plain_tokens_per_s:12.1f} {sp.speculative_tokens_per_s:11.1f} "
                    f"{sp.speedup:8.2f}x {'yes' if sp.identical else 'NO':>9}"
                )
        return "\n".join(lines)


def _short_name(r: WidthResult) -> str:
    if r.kind == "tier":
        return r.name
    return (r.kind + " " + ",".join(str(w) for w in r.widths))[:24]


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


# ---- which widths ----------------------------------------------------------------------------


def mix_n_match_widths(base: int, num_layers: int, tiers: Sequence[int]) -> list[list[int]]:
    """Mix'n'Match points between each pair of neighbouring tiers, by the paper's "least slope"
    heuristic: widths non-decreasing with depth, one change: the first layers at the narrower
    tier, the last k at the wider one, for k about L/4, L/2 and 3L/4."""
    out: list[list[int]] = []
    ts = sorted(set(tiers))
    for wide, narrow in zip(ts, ts[1:], strict=False):
        ks = sorted({round(num_layers * f) for f in (0.25, 0.5, 0.75)} - {0, num_layers})
        for k in ks:
            out.append([base >> narrow] * (num_layers - k) + [base >> wide] * k)
    return out


def _width_plan(model: MatFormerLM, tiers: Sequence[int] | None,
                widths: Sequence[Sequence[int] | int] | None,
                mix_n_match: bool) -> list[tuple[str, str, list[int]]]:
    """(name, kind, per-layer widths) for every width to evaluate, reference first."""
    base, L = model.base_width, len(model.model.layers)
    stored = model.stored_widths
    if tiers is None:
        tiers = available_tiers(base, stored)
    plan: list[tuple[str, str, list[int]]] = []
    ref_tier = uniform_tier(base, stored)
    if ref_tier is None or ref_tier not in tiers:
        # The reference is always evaluated, whatever was asked for.
        plan.append((describe_widths(base, stored), "custom" if ref_tier is None else "tier", stored))
    for t in sorted(set(tiers)):
        ws = model.resolve_widths(tier=t)
        plan.append((f"tier {t}", "tier", ws))
    if mix_n_match:
        for ws in mix_n_match_widths(base, L, [t for t in tiers if (base >> t) <= min(stored)]):
            plan.append((describe_widths(base, ws), "mix", ws))
    for w in widths or []:
        ws = model.resolve_widths(widths=w)
        plan.append((describe_widths(base, ws), "custom", ws))
    seen: set[tuple[int, ...]] = set()
    unique = []
    for name, kind, ws in plan:
        if tuple(ws) not in seen:
            seen.add(tuple(ws))
            unique.append((name, kind, ws))
    # Reference (stored widths) first, then by size.
    unique.sort(key=lambda p: (tuple(p[2]) != tuple(stored), -sum(p[2])))
    return unique


# ---- data ------------------------------------------------------------------------------------


def _as_windows(tokens: Any, seq_len: int, max_windows: int | None) -> np.ndarray:
    """A token stream (1-D) or ready windows (2-D) -> (n, seq_len) int64 windows."""
    from .data import eval_windows

    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.ndim == 2:
        if arr.shape[1] < 2:
            raise DataError(f"evaluation windows need at least 2 tokens each, got shape {arr.shape}")
        return arr[:max_windows].astype(np.int64) if max_windows else arr.astype(np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError("evaluation data must be token ids: a 1-D stream or (n, seq_len) windows")
    return eval_windows(arr, seq_len, max_windows)


def _checkpoint_folder(src: str | os.PathLike) -> Path:
    p = Path(src)
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    from .io.checkpoint import _locate

    return _locate(src)[0].folder


# ---- the evaluation --------------------------------------------------------------------------


def evaluate(
    model_or_ckpt: MatFormerLM | str | os.PathLike,
    data: Any = None,
    *,
    tiers: Sequence[int] | None = None,
    widths: Sequence[Sequence[int] | int] | None = None,
    mix_n_match: bool = True,
    seq_len: int = 256,
    max_tokens: int = 32768,
    batch_size: int = 8,
    decode: bool = True,
    speculative: bool = True,
    draft_tokens: int | str = 4,
    spec_prompts: int = 4,
    spec_prompt_len: int = 32,
    spec_new_tokens: int = 64,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate widths of one model on the same data; see the module docstring.

    `model_or_ckpt`: a `MatFormerLM`, or a checkpoint (folder, file or Hub id) loaded with
    `load_model`. `data`: token ids (a 1-D stream or (n, T) windows), a path of text files
    (tokenized with `tokenizer`, default the checkpoint's tokenizer.json), or None: the held-out
    split the checkpoint was trained beside (the default corpus's held-out split).
    `tiers` (default every tier the model can run) and `widths` (extra per-layer lists) select the
    widths; `mix_n_match` adds least-slope mixes between neighbouring tiers. Windows of `seq_len`
    tokens, at most `max_tokens` tokens in all.
    """
    say = progress or (lambda _msg: None)
    if isinstance(model_or_ckpt, MatFormerLM):
        model, source = model_or_ckpt, "in-memory model"
        if device is not None:
            model.to(device)
        if dtype is not None:
            model.to(getattr(torch, dtype))
    else:
        from .io.checkpoint import load_model

        source = str(model_or_ckpt)
        model = load_model(model_or_ckpt, dtype=dtype, device=device)
    model.eval()
    dev = model.model.embed_tokens.weight.device
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    seq_len = min(seq_len, model.config.max_position_embeddings)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")

    # ---- data -> windows (n, seq_len)
    if data is None or isinstance(data, (str, os.PathLike)):
        if isinstance(model_or_ckpt, MatFormerLM) and tokenizer is None:
            raise DataError("give evaluation data as token ids (or a tokenizer) when evaluating "
                            "an in-memory model")
        from .data import default_eval_tokens, heldout_tokens, load_texts, load_tokenizer, tokenize

        if tokenizer is None:
            tokenizer = load_tokenizer(_checkpoint_folder(model_or_ckpt))  # type: ignore[arg-type]
        if data is None:
            if isinstance(model_or_ckpt, MatFormerLM):
                stream, data_desc = default_eval_tokens(tokenizer), "default corpus (held-out split)"
            else:
                say("tokenizing the held-out split of the checkpoint's training data ...")
                stream = heldout_tokens(_checkpoint_folder(model_or_ckpt))
                data_desc = "held-out split of the training corpus"
        else:
            say(f"tokenizing {data} ...")
            stream, data_desc = tokenize(tokenizer, load_texts(data)), str(data)
        windows = _as_windows(stream, seq_len, max(1, max_tokens // seq_len))
    else:
        windows = _as_windows(data, seq_len, max(1, max_tokens // seq_len))
        data_desc = "given token ids"
    vocab = model.config.vocab_size
    if windows.size and (windows.min() < 0 or windows.max() >= vocab):
        raise DataError(f"evaluation data holds token id {int(windows.max())} outside the model's "
                        f"vocabulary of {vocab}; was it tokenized with this checkpoint's tokenizer?")
    seq_len = windows.shape[1]
    n_windows = windows.shape[0]

    plan = _width_plan(model, tiers, widths, mix_n_match)
    ref_widths = model.stored_widths
    say(f"evaluating {len(plan)} widths on {n_windows} windows x {seq_len} tokens")

    # Accumulators per width: summed CE, KL, matches; time.
    n_plan = len(plan)
    ce_sum = [0.0] * n_plan
    kl_sum = [0.0] * n_plan
    match = [0] * n_plan
    seconds = [0.0] * n_plan
    n_pred = 0  # predicted tokens (labels)
    n_pos = 0  # positions compared for consistency
    previous = model.widths
    try:
        with torch.inference_mode():
            # Warm-up (first-call allocations would be charged to the first width otherwise).
            model.set_widths(widths=plan[0][2])
            model(torch.as_tensor(windows[:1], device=dev))
            for b0 in range(0, n_windows, batch_size):
                x = torch.as_tensor(windows[b0:b0 + batch_size], device=dev)  # (B, T)
                ref_logp = ref_p = ref_best = None
                labels = x[:, 1:].unsqueeze(-1)  # (B, T-1, 1): position t predicts token t+1
                for i, (_name, _kind, ws) in enumerate(plan):
                    model.set_widths(widths=ws)
                    _sync(dev)
                    t0 = time.perf_counter()
                    logits = model(x)  # (B, T, V)
                    _sync(dev)
                    seconds[i] += time.perf_counter() - t0
                    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
                    # Summed next-token cross-entropy over the B*(T-1) labels (what lm_loss
                    # averages), from the same log-probabilities the consistency uses.
                    ce_sum[i] -= float(logp[:, :-1].gather(-1, labels).sum())
                    best = logp.argmax(-1)  # (B, T)
                    if i == 0:  # the reference (stored widths) comes first
                        ref_logp, ref_p, ref_best = logp, logp.exp(), best
                    assert ref_logp is not None and ref_p is not None and ref_best is not None
                    # KL(P_ref || P_w) per position, summed.
                    kl_sum[i] += float((ref_p * (ref_logp - logp)).sum())
                    match[i] += int((best == ref_best).sum())
                n_pred += x.shape[0] * (seq_len - 1)
                n_pos += x.numel()
            say("loss and consistency done")

            results = []
            for i, (name, kind, ws) in enumerate(plan):
                loss = ce_sum[i] / n_pred
                results.append(WidthResult(
                    name=name, widths=list(ws), kind=kind,
                    tier=uniform_tier(model.base_width, ws),
                    non_embedding_params=parameter_counts(model.config, ws)["non_embedding"],
                    loss=loss, perplexity=perplexity(loss),
                    tokens_per_s=n_windows * seq_len / seconds[i] if seconds[i] > 0 else 0.0,
                    greedy_match=match[i] / n_pos, kl_from_reference=max(0.0, kl_sum[i] / n_pos),
                ))
    finally:
        model.set_widths(widths=previous)

    report = EvalReport(
        source=source, data=data_desc, reference_widths=list(ref_widths),
        base_width=model.base_width, seq_len=seq_len, windows=n_windows,
        tokens=n_pred, device=str(dev), dtype=str(model.model.embed_tokens.weight.dtype).removeprefix("torch."),
        results=results,
    )
    if decode or speculative:
        _decode_report(model, windows, plan, report, decode=decode, speculative=speculative,
                       draft_tokens=draft_tokens, n_prompts=spec_prompts,
                       prompt_len=spec_prompt_len, new_tokens=spec_new_tokens, say=say)
    return report


def _decode_report(model: MatFormerLM, windows: np.ndarray, plan, report: EvalReport, *,
                   decode: bool, speculative: bool, draft_tokens: int | str, n_prompts: int,
                   prompt_len: int, new_tokens: int, say: Callable[[str], None]) -> None:
    """Batch-1 greedy decoding speed per width, and speculative decoding per draft width."""
    prompt_len = max(1, min(prompt_len, windows.shape[1]))
    new_tokens = min(new_tokens, model.config.max_position_embeddings - prompt_len)
    if new_tokens < 2 or n_prompts < 1:
        return
    prompts = [windows[i % len(windows), :prompt_len].tolist() for i in range(n_prompts)]
    ref = model.stored_widths
    kw = dict(ignore_eos=True)  # fixed lengths: speeds compare like with like
    # Warm-up at the reference and the smallest width.
    generate(model, prompts[0], 4, widths=ref, **kw)
    generate(model, prompts[0], 4, widths=plan[-1][2], **kw)

    plain_tokens: list[list[int]] = []
    plain_seconds = 0.0
    for p in prompts:
        out = generate(model, p, new_tokens, widths=ref, **kw)
        plain_tokens.append(out.tokens)
        plain_seconds += out.stats.seconds
    plain_rate = n_prompts * new_tokens / plain_seconds
    if decode:
        say("decoding speed per width ...")
        for r in report.results:
            if list(r.widths) == list(ref):
                r.decode_tokens_per_s = plain_rate
                continue
            secs = sum(generate(model, p, new_tokens, widths=r.widths, **kw).stats.seconds
                       for p in prompts)
            r.decode_tokens_per_s = n_prompts * new_tokens / secs
    if not speculative:
        return
    say("speculative decoding per draft width ...")
    report.speculative_settings = {"prompts": n_prompts, "prompt_len": prompt_len,
                                   "new_tokens": new_tokens, "draft_tokens": draft_tokens,
                                   "target_widths": list(ref)}
    for name, kind, ws in plan:
        if list(ws) == list(ref) or kind == "mix":
            continue
        acc = dra = 0
        secs = 0.0
        identical = True
        for p, want in zip(prompts, plain_tokens, strict=True):
            out = speculative_generate(model, p, new_tokens, widths=ref, draft_widths=ws,
                                       draft_tokens=draft_tokens, **kw)
            identical &= out.tokens == want
            acc += out.stats.accepted
            dra += out.stats.drafted
            secs += out.stats.seconds
        rate = n_prompts * new_tokens / secs
        report.speculative.append(SpeculativeResult(
            draft_name=name, draft_widths=list(ws), draft_tokens=draft_tokens,
            acceptance_rate=acc / dra if dra else 0.0, accepted=acc, drafted=dra,
            plain_tokens_per_s=plain_rate, speculative_tokens_per_s=rate,
            speedup=rate / plain_rate, identical=identical, new_tokens=n_prompts * new_tokens,
        ))


def run_eval(ckpt: str, *, json_out: str | None = None, plot: str | None = None,
             out: Any = None, **kwargs: Any) -> EvalReport:
    """`matformer eval`: evaluate a checkpoint, print the table (or JSON with `json_out="-"`,
    or write JSON to the file `json_out`), draw the elastic curve to `plot`."""
    import json
    import sys

    out = out or sys.stdout
    if plot is not None and not str(plot).lower().endswith(".png"):
        raise ConfigError(f"--plot takes a .png file name, got {plot!r}")
    report = evaluate(ckpt, **kwargs)
    if json_out == "-":
        out.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        out.write(report.format() + "\n")
        if json_out is not None:
            try:
                Path(json_out).write_text(json.dumps(report.to_dict(), indent=2) + "\n",
                                          encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"{json_out}: cannot write the JSON report ({e.strerror or e}); "
                                  f"choose another --json-out") from None
    if plot is not None:
        from .plot import plot_elastic_curve

        try:
            plot_elastic_curve(report, plot, title=f"MatFormer evaluation: {Path(ckpt).name}")
        except OSError as e:
            raise ConfigError(f"{plot}: cannot write the plot ({e.strerror or e}); choose another "
                              f"--plot") from None
    return report
