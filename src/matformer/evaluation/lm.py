"""Evaluate every width of one elastic model: loss, consistency with the full width, speed.

`evaluate(model_or_ckpt, data, ...)` runs each requested width (default: every tier the model can
run, a few Mix'n'Match mixes between neighbouring tiers, and any extra per-layer width lists) on
the same held-out windows; with nested heads (issue 11) every tier also at every KV head count
the checkpoint can run (the (tier, kv_heads) grid). It reports, per point:

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
- KV-cache bytes per token at the point's heads (what a long context costs in memory);
and a speculative decoding report: for each smaller tier (and each extra width list) as the
draft and the reference as the target, the acceptance rate of greedy drafts, the speed-up of
`speculative_generate` over plain `generate` at the reference width, and whether the output was
identical (it must be).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from matformer.data import token_files
from matformer.data.splits import HELD_OUT, corpus_name, corpus_part, same_corpus
from matformer.data.text import (
    heldout_shape,
    heldout_windows,
    load_tokenizer,
    training_data,
    training_settings,
)
from matformer.errors import ConfigError, DataError
from matformer.evaluation.compile_clock import compile_seconds
from matformer.inference.decode import generate
from matformer.inference.sampling import sync_device
from matformer.inference.speculative import PROBE_TOKENS, DecodeCosts, speculative_generate
from matformer.io.checkpoint import load_model
from matformer.io.source import Source, resolve_source
from matformer.models.lm.config import perplexity
from matformer.models.lm.model import MatFormerLM
from matformer.models.lm.shapes import kv_cache_bytes_per_token
from matformer.models.registry import non_embedding_parameters
from matformer.tiers import (
    WidthRequest,
    describe_heads,
    describe_widths,
    mix_n_match_plans,
    runnable_kv_heads,
    runnable_tiers,
    uniform_tier,
)


@dataclass
class WidthResult:
    name: str
    """'tier 2', 'tier 2, 1 KV head', or 'mix' + per-layer widths."""
    widths: list[int]
    kind: str
    """'tier' (a trained granularity at the stored heads), 'heads' (a tier at fewer KV heads:
    the second axis), 'mix' (Mix'n'Match) or 'custom' (a requested plan)."""
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
    kv_heads: list[int] = field(default_factory=list)
    """KV heads per layer at this point."""
    kv_cache_bytes_per_token: int = 0
    """KV cache one token of one sequence takes at these heads, in the evaluated dtype."""


@dataclass
class SpeculativeResult:
    draft_name: str
    draft_widths: list[int]
    draft_tokens: int | str
    acceptance_rate: float
    accepted: int
    drafted: int
    plain_tokens_per_s: float
    """Plain decoding at the target, timed prompt by prompt beside this row's runs."""
    speculative_tokens_per_s: float
    speedup: float
    identical: bool
    """Greedy speculative output equal, token for token, to plain decoding at the target."""
    new_tokens: int
    draft_kv_heads: list[int] = field(default_factory=list)
    chosen_draft_tokens: int | None = None
    """The k the costs chose (draft_tokens "auto"), in the last round of the last prompt."""
    chosen: bool = False
    """The row of `draft_tier="auto"`: draft and k both chosen from the measured costs."""


@dataclass
class EvalReport:
    """What `evaluate` measured (the CLI formats it: `matformer.evaluation.report`)."""

    source: str
    data: str
    """What was scored: the corpus, the part of it and how it was split (`data.splits`)."""
    reference_widths: list[int]
    base_width: int
    seq_len: int
    windows: int
    split: str
    """The part of the corpus scored: 'held-out' (the default), 'all', or 'given' token ids."""
    tokens: int
    """Tokens predicted per width (windows x (seq_len - 1))."""
    device: str
    dtype: str
    results: list[WidthResult] = field(default_factory=list)
    speculative: list[SpeculativeResult] = field(default_factory=list)
    speculative_settings: dict[str, Any] = field(default_factory=dict)
    speculative_costs: dict[str, Any] = field(default_factory=dict)
    """`speculative.DecodeCosts` the automatic choices were made from (seconds)."""
    speculative_choice: dict[str, Any] = field(default_factory=dict)
    """`speculative.DraftChoice` of `draft_tier="auto"` (last round of the last prompt)."""
    kl_direction: str = "KL(P_reference || P_width), nats per position"
    compile_seconds: float | None = None
    """--compile: seconds torch.compile spent compiling, kept out of every decoding speed."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalWidth:
    """One width (and KV head setting) to evaluate."""

    name: str
    kind: str
    """'tier', 'heads', 'mix' or 'custom' (see `WidthResult.kind`)."""
    widths: list[int]
    kv_heads: list[int] = field(default_factory=list)
    """KV heads per layer (empty: as stored)."""

    def setting(self, model: MatFormerLM) -> dict[str, list[int]]:
        """`set_widths` keywords of this point."""
        return {"widths": self.widths, "layer_kv_heads": self.kv_heads or model.stored_kv_heads}


# ---- which widths ----------------------------------------------------------------------------


def select_widths(model: MatFormerLM, uniform_tiers: Sequence[int] | None = None,
                  plans: Sequence[Sequence[int] | int] | None = None,
                  mix_n_match: bool = True, kv_heads: Sequence[int] | None = None,
                  layer_kv_heads: Sequence[Sequence[int]] | None = None) -> list[EvalWidth]:
    """Every point to evaluate, the reference (the stored widths and heads) first, then by size:
    `uniform_tiers` (default: every tier the model can run, at most 4), least-slope Mix'n'Match
    plans between neighbouring ones when `mix_n_match`, and the extra width `plans`; each
    uniform tier also at every KV head count in `kv_heads` and every per-layer list in
    `layer_kv_heads` (the (tier, kv_heads) grid of the two elastic axes)."""
    base, num_layers = model.base_width, len(model.model.layers)
    stored = model.stored_widths
    if uniform_tiers is None:
        uniform_tiers = runnable_tiers(base, stored, limit=4)
    selected: list[EvalWidth] = []
    ref_tier = uniform_tier(base, stored)
    if ref_tier is None or ref_tier not in uniform_tiers:
        # The reference is always evaluated, whatever was asked for.
        selected.append(EvalWidth(describe_widths(base, stored),
                                  "custom" if ref_tier is None else "tier", stored))
    for t in sorted(set(uniform_tiers)):
        selected.append(EvalWidth(f"tier {t}", "tier", model.resolve_widths(tier=t)))
    if mix_n_match:
        held = [t for t in uniform_tiers if t in runnable_tiers(base, stored)]
        for ws in mix_n_match_plans(base, num_layers, held):
            selected.append(EvalWidth(describe_widths(base, ws), "mix", ws))
    for w in plans or []:
        ws = model.resolve_widths(widths=w)
        selected.append(EvalWidth(describe_widths(base, ws), "custom", ws))
    selected += _head_points(model, [e for e in selected if e.kind == "tier"], kv_heads,
                             layer_kv_heads)
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    unique = []
    for e in selected:
        key = (tuple(e.widths), tuple(e.kv_heads or model.stored_kv_heads))
        if key not in seen:
            seen.add(key)
            unique.append(e)
    full = (stored, model.stored_kv_heads)
    unique.sort(key=lambda e: ((e.widths, e.kv_heads or full[1]) != full,
                               -sum(e.widths), -sum(e.kv_heads or full[1])))
    return unique


def _head_points(model: MatFormerLM, tiers: Sequence[EvalWidth], kv_heads: Sequence[int] | None,
                 layer_kv_heads: Sequence[Sequence[int]] | None) -> list[EvalWidth]:
    """Each uniform tier at each requested KV head setting other than the stored one."""
    stored = model.stored_kv_heads
    settings = [model.resolve_kv_heads(kv_heads=g) for g in kv_heads or []]
    settings += [model.resolve_kv_heads(layer_kv_heads=list(hl)) for hl in layer_kv_heads or []]
    out = []
    for hl in settings:
        if hl == stored:
            continue
        for e in tiers:
            out.append(EvalWidth(f"{e.name}, {describe_heads(hl)}", "heads", e.widths, hl))
    return out


def default_kv_heads(model: MatFormerLM, folder: Path | None) -> list[int]:
    """The KV head counts `evaluate` crosses with the tiers by default: every head granularity
    the model holds when its heads nest (its training's train_config.json says nest_heads, or
    its heads are already cut below the base), else the stored heads only."""
    stored = model.stored_kv_heads
    nested = any(g < model.config.base_kv_heads for g in stored) or bool(
        folder is not None and training_settings(folder).get("nest_heads"))
    return runnable_kv_heads(model.config.base_kv_heads, stored) if nested else []


# ---- data ------------------------------------------------------------------------------------


def _as_windows(tokens: Any, seq_len: int, max_windows: int | None) -> np.ndarray:
    """A token stream (1-D) or ready windows (2-D) -> (n, seq_len) int64 windows."""
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.ndim == 2:
        if arr.shape[1] < 2:
            raise DataError(f"evaluation windows need at least 2 tokens each, got shape {arr.shape}")
        return arr[:max_windows].astype(np.int64) if max_windows else arr.astype(np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError("evaluation data must be token ids: a 1-D stream or (n, seq_len) windows")
    return heldout_windows(arr, seq_len, max_windows)


def _checkpoint_folder(src: str | os.PathLike | Source) -> Path:
    return resolve_source(src).folder


def _window_shape(model_or_ckpt: MatFormerLM | str | os.PathLike, data: Any, seq_len: int | None,
                  max_tokens: int | None, max_positions: int) -> tuple[int, int]:
    """(seq_len, windows): as asked; by default, on a checkpoint's own corpus (no `data`, or the
    data its run trained on), the windows its training evaluated (its train_config.json), else
    data.HELDOUT_SEQ_LEN x HELDOUT_WINDOWS."""
    own = not isinstance(model_or_ckpt, torch.nn.Module) and (
        data is None or isinstance(data, (str, os.PathLike)))
    settings = training_settings(_checkpoint_folder(model_or_ckpt)) if own else {}  # type: ignore[arg-type]
    if data is not None and not same_corpus(data, settings.get("data")):
        settings = {}
    default_len, default_windows = heldout_shape(settings)
    seq_len = min(default_len if seq_len is None else seq_len, max_positions)
    return seq_len, default_windows if max_tokens is None else max(1, max_tokens // seq_len)


def _evaluation_windows(model_or_ckpt: MatFormerLM | str | os.PathLike, data: Any,
                        tokenizer: Any, seq_len: int, max_windows: int, split: str,
                        say: Callable[[str], None]) -> tuple[np.ndarray, str, str]:
    """(windows (n, seq_len), a description of the data, the part scored) for `evaluate`'s
    `data` argument: token ids as given, else the `split` part of a corpus (`data.splits`)."""
    if data is not None and not isinstance(data, (str, os.PathLike)):
        return _as_windows(data, seq_len, max_windows), "given token ids", "given"
    in_memory = isinstance(model_or_ckpt, torch.nn.Module)
    folder = None if in_memory else _checkpoint_folder(model_or_ckpt)  # type: ignore[arg-type]
    tokenizer_file = None
    if tokenizer is None and folder is not None:  # the checkpoint's (checked against a folder's)
        tokenizer, tokenizer_file = load_tokenizer(folder), folder / "tokenizer.json"
    if tokenizer is None and not token_files.is_prepared(data):
        raise DataError("give evaluation data as token ids (or a tokenizer) when evaluating "
                        "an in-memory model")
    if data is None and folder is not None:
        data = training_data(folder)  # the run's own corpus (None: the default corpus)
        if not training_settings(folder):
            say(f"{folder} records no training data (no train_config.json): scoring the default "
                f"corpus; pass --data to choose")
    if not token_files.is_prepared(data):  # (a prepared folder's errors stay one line)
        say(f"tokenizing the {split} part of {corpus_name(data)} ...")
    part = corpus_part(data, tokenizer, split, checkpoints=[folder] if folder else [],
                       tokenizer_file=tokenizer_file)
    say(f"data: {part.description}")
    return _as_windows(part.tokens, seq_len, max_windows), part.description, part.part


def evaluation_windows(source: Source, data: Any = None, *, seq_len: int | None = None,
                       max_windows: int | None = None, max_positions: int,
                       progress: Callable[[str], None] | None = None,
                       split: str = HELD_OUT) -> tuple[np.ndarray, str]:
    """(windows (n, seq_len), a description of the data): the held-out windows `evaluate` scores
    for the checkpoint `source` (data None: its own training's held-out split), at most
    `max_windows` of them (the `split` part of a corpus: the held-out one by default); for other
    callers that score widths on the same data (`plan`)."""
    seq_len, n = _window_shape(source, data, seq_len, None, max_positions)
    n = n if max_windows is None else min(n, max_windows)
    windows, desc, _part = _evaluation_windows(source, data, None, seq_len, n, split,
                                               progress or (lambda _msg: None))
    return windows, desc


# ---- the evaluation --------------------------------------------------------------------------


def evaluate(
    model_or_ckpt: MatFormerLM | str | os.PathLike | Source,
    data: Any = None,
    *,
    tier: int | None = None,
    uniform_tiers: Sequence[int] | None = None,
    plans: Sequence[Sequence[int] | int] | None = None,
    mix_n_match: bool = True,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    decode: bool = True,
    speculative: bool = True,
    draft_tokens: int | str = "auto",
    compile: bool = False,
    spec_prompts: int = 4,
    spec_prompt_len: int = 32,
    spec_new_tokens: int = 64,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
    kv_heads: int | Sequence[int] | None = None,
    layer_kv_heads: Sequence[Sequence[int]] | None = None,
    layer_tiers: Sequence[int] | None = None,
    split: str = HELD_OUT,
) -> EvalReport:
    """Evaluate widths of one model on the same data; see the module docstring.

    `model_or_ckpt`: a `MatFormerLM`, or a checkpoint (folder, .safetensors file, Hub id or
    multi-tier repo: anything `io.source.resolve_source` takes) loaded with `load_model`.
    `tier`: run at that tier: of a multi-tier repo the folder that holds it is used, and the
    widths evaluated are that tier (plus the stored reference) unless `uniform_tiers` is given;
    `layer_tiers` (one tier per layer) the same for a per-layer plan (of a multi-tier repo, the
    folder holding its widest layer).
    `data`: token ids (a 1-D stream or (n, T) windows), a path of text files or a packaged
    corpus name such as "builtin:kjv" (tokenized with `tokenizer`, default the checkpoint's
    tokenizer.json), a token folder written by `matformer prepare-data` (its tokenizer must be
    the model's), or None: the corpus the checkpoint was trained on (the default corpus).
    `split`: the part of that corpus scored (`data.splits`): "held-out" (default: the part no
    training or calibration step reads, split as the checkpoint's training split it) or "all".
    `uniform_tiers` (default every tier the model can run) and `plans` (extra per-layer width
    lists) select the widths; `mix_n_match` adds least-slope mixes between neighbouring tiers.
    `kv_heads` (one count or several) and `layer_kv_heads` (per-layer lists): the head settings
    every uniform tier is also evaluated at (default: every head granularity the checkpoint
    holds when its heads nest, see `default_kv_heads`; the stored heads are always evaluated).
    Windows of `seq_len` tokens, at most `max_tokens` tokens in all, evenly spaced over the data
    (`data.heldout_windows`); by default (and for the token folder it trained on) the windows
    the checkpoint's training evaluated, so a tier's loss here is its last logged val loss. `progress` receives
    progress lines (the CLI prints them to stderr).
    """
    say = progress or (lambda _msg: None)
    if seq_len is not None and seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    if not isinstance(model_or_ckpt, torch.nn.Module):
        # One resolution (a multi-tier repo: the folder holding `tier`; the Hub: the tokenizer
        # too); every later use of `model_or_ckpt` reads this Source's folder.
        model_or_ckpt = resolve_source(
            model_or_ckpt, request=WidthRequest(tier=tier, layer_tiers=layer_tiers),
            companions=True)
        if not model_or_ckpt.family.text:
            raise ConfigError(f"{model_or_ckpt.describe()}: a {model_or_ckpt.family.name} "
                              f"checkpoint ({model_or_ckpt.family.task}), not a text model; "
                              f"`matformer eval` evaluates it as one")
    model, source = _model_to_evaluate(model_or_ckpt, device, dtype)
    if layer_tiers is not None:
        plans = [*(plans or []), model.resolve(WidthRequest(layer_tiers=layer_tiers)).widths]
    if uniform_tiers is None and (tier is not None or layer_tiers is not None):
        uniform_tiers = [] if tier is None else [tier]
    seq_len, max_windows = _window_shape(model_or_ckpt, data, seq_len, max_tokens,
                                         model.config.max_position_embeddings)
    windows, data_desc, part = _evaluation_windows(model_or_ckpt, data, tokenizer, seq_len,
                                                   max_windows, split, say)
    _check_vocab(windows, model.config.vocab_size)
    heads = _heads_to_evaluate(model, model_or_ckpt, kv_heads, layer_kv_heads)
    selected = select_widths(model, uniform_tiers, plans, mix_n_match, heads, layer_kv_heads)
    say(f"evaluating {len(selected)} widths on {windows.shape[0]} windows x {windows.shape[1]} tokens")
    weight = model.model.embed_tokens.weight
    report = EvalReport(
        source=source, data=data_desc, reference_widths=model.stored_widths,
        base_width=model.base_width, seq_len=windows.shape[1], windows=windows.shape[0], split=part,
        tokens=windows.shape[0] * (windows.shape[1] - 1), device=str(weight.device),
        dtype=str(weight.dtype).removeprefix("torch."),
        results=measure_widths(model, windows, selected, batch_size, progress is not None),
    )
    say("loss and consistency done")
    if decode or speculative:
        _decode_report(model, windows, selected, report, decode=decode, speculative=speculative,
                       draft_tokens=draft_tokens, n_prompts=spec_prompts,
                       prompt_len=spec_prompt_len, new_tokens=spec_new_tokens, say=say,
                       compile=compile)
    return report


def _check_vocab(windows: np.ndarray, vocab: int) -> None:
    if windows.size and (windows.min() < 0 or windows.max() >= vocab):
        raise DataError(f"evaluation data holds token id {int(windows.max())} outside the model's "
                        f"vocabulary of {vocab}; was it tokenized with this checkpoint's tokenizer?")


def _heads_to_evaluate(model: MatFormerLM, model_or_ckpt: MatFormerLM | Source,
                       kv_heads: int | Sequence[int] | None,
                       layer_kv_heads: Sequence[Sequence[int]] | None) -> Sequence[int] | None:
    """The uniform head counts to evaluate: as asked, or (nothing asked) `default_kv_heads`."""
    if kv_heads is None and layer_kv_heads is None:
        own = None if isinstance(model_or_ckpt, torch.nn.Module) else _checkpoint_folder(model_or_ckpt)
        kv_heads = default_kv_heads(model, own)
    return [kv_heads] if isinstance(kv_heads, int) else kv_heads


def _model_to_evaluate(model_or_source: MatFormerLM | Source, device: str | torch.device | None,
                       dtype: str | None) -> tuple[MatFormerLM, str]:
    """(the model in eval mode on `device` in `dtype`, a description of where it came from)."""
    if isinstance(model_or_source, torch.nn.Module):
        model = model_or_source
        if device is not None:
            model.to(device)
        if dtype is not None:
            model.to(getattr(torch, dtype))
        return model.eval(), "in-memory model"
    return load_model(model_or_source, dtype=dtype, device=device).eval(), str(model_or_source)


def measure_widths(model: MatFormerLM, windows: np.ndarray, selected: Sequence[EvalWidth],
                   batch_size: int = 8, progress: bool = False) -> list[WidthResult]:
    """Loss, consistency with the first width of `selected` (the reference) and forward speed of
    every width, on the same `windows` (n, T); the model's widths are restored afterwards.
    `progress`: a bar on stderr, one step per width per batch, naming the width."""
    dev = model.model.embed_tokens.weight.device
    n_windows, seq_len = windows.shape
    n = len(selected)
    ce_sum, kl_sum, seconds, match = [0.0] * n, [0.0] * n, [0.0] * n, [0] * n
    with model.at_width(**model.setting), torch.inference_mode():
        if n > 1:  # warm-up: first-call allocations would be charged to the first width
            model.set_widths(**selected[0].setting(model))
            model(torch.as_tensor(windows[:1], device=dev))
        bar = tqdm(total=-(-n_windows // batch_size) * n, unit="forward", desc="loss per width",
                   file=sys.stderr, disable=not progress)
        for b0 in range(0, n_windows, batch_size):
            x = torch.as_tensor(windows[b0:b0 + batch_size], device=dev)  # (B, T)
            labels = x[:, 1:].unsqueeze(-1)  # (B, T-1, 1): position t predicts token t+1
            ref_logp = ref_p = ref_best = torch.empty(0)
            for i, width in enumerate(selected):
                bar.set_postfix_str(width.name, refresh=False)
                bar.update()
                model.set_widths(**width.setting(model))
                sync_device(dev)
                t0 = time.perf_counter()
                logits = model(x)  # (B, T, V)
                sync_device(dev)
                seconds[i] += time.perf_counter() - t0
                logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
                # Summed next-token cross-entropy over the B*(T-1) labels (what lm_loss
                # averages), from the same log-probabilities the consistency uses.
                ce_sum[i] -= float(logp[:, :-1].gather(-1, labels).sum())
                if i == 0:  # the reference comes first: KL 0, every token its own
                    match[i] += int(x.numel())
                    if n > 1:
                        ref_logp, ref_p, ref_best = logp, logp.exp(), logp.argmax(-1)
                    continue
                # KL(P_ref || P_w), one (B, T, V) temporary
                kl_sum[i] += float((ref_logp - logp).mul_(ref_p).sum())
                match[i] += int((logp.argmax(-1) == ref_best).sum())
        bar.close()
    n_pred, n_pos = n_windows * (seq_len - 1), n_windows * seq_len
    results = []
    itemsize = model.model.embed_tokens.weight.element_size()
    for i, width in enumerate(selected):
        loss = ce_sum[i] / n_pred
        heads = width.setting(model)["layer_kv_heads"]
        results.append(WidthResult(
            name=width.name, widths=list(width.widths), kind=width.kind,
            tier=uniform_tier(model.base_width, width.widths),
            non_embedding_params=non_embedding_parameters(model.config, width.widths, heads),
            kv_heads=list(heads),
            kv_cache_bytes_per_token=kv_cache_bytes_per_token(model.config, heads, itemsize),
            loss=loss, perplexity=perplexity(loss),
            tokens_per_s=n_pos / seconds[i] if seconds[i] > 0 else 0.0,
            greedy_match=match[i] / n_pos, kl_from_reference=max(0.0, kl_sum[i] / n_pos),
        ))
    return results


def _decode_report(model: MatFormerLM, windows: np.ndarray, selected: Sequence[EvalWidth],
                   report: EvalReport, *, decode: bool, speculative: bool,
                   draft_tokens: int | str, n_prompts: int, prompt_len: int, new_tokens: int,
                   say: Callable[[str], None], compile: bool = False) -> None:
    """Batch-1 greedy decoding speed per width, and speculative decoding per draft width and
    with the draft and k chosen from measured costs (`draft_tier="auto"`)."""
    prompt_len = max(1, min(prompt_len, windows.shape[1]))
    new_tokens = min(new_tokens, model.config.max_position_embeddings - prompt_len)
    if new_tokens < 2 or n_prompts < 1:
        return
    prompts = [windows[i % len(windows), :prompt_len].tolist() for i in range(n_prompts)]
    ref, ref_heads = model.stored_widths, model.stored_kv_heads
    compiled_before = compile_seconds()
    # Warm-up at the reference and the smallest width.
    generate(model, prompts[0], 4, widths=ref, layer_kv_heads=ref_heads, ignore_eos=True,
             compile=compile)
    generate(model, prompts[0], 4, ignore_eos=True, compile=compile,
             **selected[-1].setting(model))
    plain = [generate(model, p, new_tokens, widths=ref, layer_kv_heads=ref_heads, ignore_eos=True,
                      compile=compile) for p in prompts]
    plain_rate = n_prompts * new_tokens / sum(out.stats.seconds for out in plain)
    if decode:
        for i, r in enumerate(report.results, 1):
            say(f"decoding speed: {r.name} ({i}/{len(report.results)})")
            full = r.widths == ref and r.kv_heads == ref_heads
            r.decode_tokens_per_s = plain_rate if full else _decode_rate(
                model, prompts, new_tokens, {"widths": r.widths, "layer_kv_heads": r.kv_heads},
                compile)
    if compile:
        report.compile_seconds = compile_seconds() - compiled_before
        say(f"compiled in {report.compile_seconds:.1f} s (warm-up calls; not in the decoding "
            f"speeds)")
    if not speculative:
        return
    say("speculative decoding per draft width ...")
    report.speculative_settings = {"prompts": n_prompts, "prompt_len": prompt_len,
                                   "new_tokens": new_tokens, "draft_tokens": draft_tokens,
                                   "target_widths": list(ref), "compiled": compile}
    want = [out.tokens for out in plain]
    # The automatic choice first: its costs are measured once before the timed rows (as the
    # warm-up above compiled plain decoding; a server or a later call reuses them too) and
    # reused by the rows after it.
    auto = EvalWidth("auto", "auto", [])
    # (long enough to pass auto's plain start and probe: when it finds drafting may pay, the
    # costs are measured here, not in a timed row)
    costs = speculative_generate(model, prompts[0], min(PROBE_TOKENS + 2, new_tokens),
                                 widths=ref, layer_kv_heads=ref_heads,
                                 draft_tier="auto", ignore_eos=True,
                                 compile=compile).extra.get("costs")
    costs = _speculative_result(model, prompts, want, auto, new_tokens, "auto",
                                compile, costs, report)
    for width in selected:
        if (width.widths, width.setting(model)["layer_kv_heads"]) != (ref, ref_heads) \
                and width.kind != "mix":
            _speculative_result(model, prompts, want, width, new_tokens,
                                draft_tokens, compile, costs, report)
    if compile:  # the draft widths' compilations too
        report.compile_seconds = compile_seconds() - compiled_before


def _decode_rate(model: MatFormerLM, prompts: list[list[int]], new_tokens: int,
                 setting: dict[str, list[int]], compile: bool = False) -> float:
    """Greedy batch-1 decoding tokens/s at `setting` (widths and KV heads) over `prompts` (fixed
    lengths: EOS ignored, so speeds compare like with like). Compiled: one warm-up call first,
    so the width's compilation is not charged to its speed."""
    if compile:
        generate(model, prompts[0], 2, ignore_eos=True, compile=True, **setting)
    secs = sum(generate(model, p, new_tokens, ignore_eos=True, compile=compile,
                        **setting).stats.seconds for p in prompts)
    return len(prompts) * new_tokens / secs


def _speculative_result(model: MatFormerLM, prompts: list[list[int]], plain: list[list[int]],
                        draft: EvalWidth, new_tokens: int,
                        draft_tokens: int | str, compile: bool, costs: DecodeCosts | None,
                        report: EvalReport) -> DecodeCosts | None:
    """Speculative decoding at the stored widths drafted by `draft` (kind "auto": the draft
    and k chosen from costs), against plain decoding's tokens `plain` on the same prompts and
    its speed timed beside each (prompt by prompt, interleaved); appends the row to `report` and returns the costs measured (or
    reused from `costs`) when a choice was made."""
    acc = dra = 0
    secs = plain_secs = 0.0
    identical = True
    auto = draft.kind == "auto"
    heads = [] if auto else draft.setting(model)["layer_kv_heads"]
    how = ({"draft_tier": "auto"} if auto else
           {"draft_widths": draft.widths, "draft_layer_kv_heads": heads})
    for p, want in zip(prompts, plain, strict=True):
        # plain decoding of the same prompt just before: the row's speed-up is against plain
        # decoding timed in the same stretch (a busy machine's load changes within seconds)
        plain_secs += generate(model, p, new_tokens, widths=model.stored_widths,
                               layer_kv_heads=model.stored_kv_heads, ignore_eos=True,
                               compile=compile).stats.seconds
        out = speculative_generate(model, p, new_tokens, widths=model.stored_widths,
                                   layer_kv_heads=model.stored_kv_heads, draft_tokens=draft_tokens,
                                   ignore_eos=True, compile=compile, costs=costs, **how)
        costs = out.extra.get("costs", costs)
        identical &= out.tokens == want
        acc += out.stats.accepted
        dra += out.stats.drafted
        secs += out.stats.seconds
    choice = out.extra.get("choice")
    if auto and choice is not None:
        report.speculative_choice = choice.to_dict()
        report.speculative_costs = costs.to_dict() if costs is not None else {}
    rate = len(prompts) * new_tokens / secs
    plain_rate = len(prompts) * new_tokens / plain_secs
    name = (f"auto: {choice.draft or 'plain'}" if auto and choice is not None else draft.name)
    report.speculative.append(SpeculativeResult(
        draft_name=name, draft_widths=list(out.draft_widths or []), draft_tokens=draft_tokens,
        draft_kv_heads=list(heads), chosen_draft_tokens=choice.k if choice else None,
        chosen=auto, acceptance_rate=acc / dra if dra else 0.0, accepted=acc, drafted=dra,
        plain_tokens_per_s=plain_rate, speculative_tokens_per_s=rate,
        speedup=rate / plain_rate, identical=identical, new_tokens=len(prompts) * new_tokens,
    ))
    return costs
