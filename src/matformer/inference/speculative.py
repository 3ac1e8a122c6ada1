"""Speculative decoding: a small width (or a separate small model) drafts, the target verifies.

`speculative_generate(model, prompt, ...)`: the draft proposes k tokens one step at a time, the
target width checks them in one forward of k+1 tokens. With a width of the same model as the
draft, draft and verifier share ONE static KV cache (`decoding.StaticDecoder`): the draft writes
its entries for the round, the cache is cropped back and the verify forward writes its own over
them, so every position the output keeps holds the verifier's entries (the paper's "shared
cache"). A separate draft model (`draft_model=`, e.g. an independently trained small model)
keeps its own cache, cropped to the accepted prefix after each round. Greedy output is token for
token the target's greedy output; with sampling the standard rule (accept a draft token d with
probability min(1, p(d)/q(d)), else resample from norm(max(0, p - q))) leaves the output
distributed as the target's (processed) distribution p.

Choosing the draft from measured costs (`draft_tier="auto"`, `draft_tokens="auto"`):
`measure_costs` times, once on the running machine and at the current cache position, a
one-token step of the target and of every candidate draft, and the (k+1)-token verify for each
k. With i.i.d. acceptance probability alpha a round of k drafts emits
E(alpha, k) = (1 - alpha^(k+1)) / (1 - alpha) tokens in k * draft_step + verify(k) seconds;
`choose_draft` picks the (draft, k) of the highest expected tokens/s, or plain decoding when no
pair beats one target step per token. alpha starts from the draft's agreement with the target
on the prompt (teacher-forced, one forward each) and follows the acceptance observed as rounds
go, the choice re-made after every round from the same costs. Only the draft in use is
observed, so a draft whose few-token prompt agreement was low by chance is tried (`explore`)
while its optimistic acceptance (EXPLORE_Z standard errors up) would win, until it has drafted
PRIOR_WEIGHT tokens.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from matformer.errors import ConfigError
from matformer.inference.decode import static_decoder
from matformer.inference.sampling import (
    GenerationOutput,
    GenerationStats,
    Sampler,
    StreamCallback,
    check_lengths,
    default_draft_tier,
    prompt_ids,
    sampler_and_eos,
    sync_device,
)
from matformer.inference.static_cache import StaticDecoder
from matformer.models.lm.model import MatFormerLM
from matformer.tiers import (
    Setting,
    WidthRequest,
    check_heads_held,
    describe_heads,
    describe_widths,
    runnable_tiers,
)

AUTO_MAX_DRAFT_TOKENS = 8
"""Largest k `draft_tokens="auto"` considers (each k is one more compiled verify graph)."""

PRIOR_WEIGHT = 16
"""Drafted tokens the prompt's agreement counts for against the acceptance observed later."""

EXPLORE_Z = 2.0
"""`draft_tier="auto"` tries a draft it is not using, until it has drafted PRIOR_WEIGHT tokens,
when the acceptance it might have (its estimate plus EXPLORE_Z standard errors) would beat the
chosen draft's expected speed-up: the prompt's agreement is an estimate from a few tokens, and
only the draft in use is observed. After that the estimates alone decide."""


@dataclass
class Draft:
    """A draft candidate: a width of the target model (`model` None: it shares the target's
    cache) or a separate model at its current widths."""

    name: str
    widths: list[int]
    model: MatFormerLM | None = None
    kv_heads: list[int] | None = None
    """KV heads per layer (None: as the model stores); a width of the target runs at most the
    target's heads (it shares the target's cache)."""

    @property
    def setting(self) -> Setting:
        """The setting of this draft (a width of the target: its heads are always given)."""
        return Setting(self.widths, self.kv_heads or [])


@dataclass
class DecodeCosts:
    """Seconds measured on this machine at one cache position (median of a few runs)."""

    target_step: float
    """One token at the target width."""
    draft_steps: dict[str, float]
    """One token at each draft, by name."""
    verify: dict[int, float]
    """k -> one forward of k+1 tokens at the target width."""
    position: int = 0
    seconds: float = 0.0
    """Time spent measuring."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DraftChoice:
    draft: str | None
    """The draft's name; None: plain decoding is expected to be fastest."""
    k: int
    acceptance: float
    expected_tokens_per_round: float
    expected_speedup: float
    """Expected tokens/s over plain decoding's, from the costs."""
    explore: bool = False
    """Chosen to learn its acceptance: its estimate's upper bound, not its estimate, would win
    (`acceptance` and the expectations are then the upper bound's)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the cost model ------------------------------------------------------------------------------


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round of k drafts emits when each is accepted independently with probability
    alpha: the accepted prefix plus the verifier's own token, (1 - alpha^(k+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, k: int, draft_step: float, verify: float,
                     target_step: float) -> float:
    """Expected tokens/s of rounds of k drafts over one target step per token."""
    return expected_tokens(alpha, k) / (k * draft_step + verify) * target_step


def choose_draft(costs: DecodeCosts, acceptance: dict[str, float],
                 ks: Sequence[int] | None = None, *, allow_plain: bool = True) -> DraftChoice:
    """The (draft, k) of the highest expected speed-up among the drafts in `acceptance` and
    the k in `ks` (default every k `costs.verify` holds); with `allow_plain`, plain decoding
    (draft None, speed-up 1) when no pair is expected to beat it."""
    best = DraftChoice(None, 0, 0.0, 1.0, 1.0 if allow_plain else 0.0)
    for name, alpha in acceptance.items():
        for k in ks if ks is not None else sorted(costs.verify):
            gain = expected_speedup(alpha, k, costs.draft_steps[name], costs.verify[k],
                                    costs.target_step)
            if gain > best.expected_speedup:
                best = DraftChoice(name, k, alpha, expected_tokens(alpha, k), gain)
    return best


# ---- measuring ----------------------------------------------------------------------------------


def _timed(fn: Any, device: torch.device, reps: int) -> float:
    """Median seconds of `fn()` over `reps` runs after one warm-up (which compiles)."""
    fn()
    times = []
    for _ in range(reps):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_costs(model: MatFormerLM, dec: StaticDecoder, target: Setting,
                  drafts: Sequence[Draft], draft_decs: dict[str, StaticDecoder],
                  ks: Sequence[int], reps: int = 3) -> DecodeCosts:
    """Time a target step, each draft's step and each k's verify at `dec`'s position (every
    forward is cropped away again); the model is left at the `target` setting."""
    t0 = time.perf_counter()
    pos = dec.pos
    # one contiguous tensor per length, as the rounds pass (a slice would be copied each call)
    toks = {n: torch.zeros(1, n, dtype=torch.long, device=dec.device)
            for n in (1, *(k + 1 for k in ks))}

    def run(d: StaticDecoder, n: int) -> None:
        at = d.pos
        d.forward(toks[n])
        d.crop(at)

    verify = {}
    model.apply(target)
    target_step = _timed(lambda: run(dec, 1), dec.device, reps)
    for k in ks:
        verify[k] = _timed(lambda k=k: run(dec, k + 1), dec.device, reps)
    steps = {}
    for d in drafts:
        if d.model is None:
            model.apply(d.setting)
            steps[d.name] = _timed(lambda: run(dec, 1), dec.device, reps)
        else:
            steps[d.name] = _timed(lambda d=d: run(draft_decs[d.name], 1), dec.device, reps)
    model.apply(target)
    return DecodeCosts(target_step, steps, verify, pos, time.perf_counter() - t0)


def prompt_agreement(model: MatFormerLM, ids: torch.Tensor, target: Setting,
                     drafts: Sequence[Draft], sampler: Sampler) -> dict[str, float]:
    """Each draft's acceptance probability estimated on the prompt `ids` (1, P), teacher-forced:
    greedy, the fraction of positions whose argmax equals the target's; sampling, the mean of
    sum_v min(p, q) (the probability the rule accepts a draft token)."""
    def dist(m: MatFormerLM, setting: Setting | None) -> torch.Tensor:
        with m.running(setting) if setting is not None else contextlib.nullcontext():
            logits = m(ids)[0]  # (P, V)
        return logits.argmax(-1) if sampler.greedy else sampler.probs(logits)

    p = dist(model, target)
    agree = {}
    for d in drafts:
        q = dist(d.model, None) if d.model is not None else dist(model, d.setting)
        agree[d.name] = float((p == q).float().mean() if sampler.greedy
                              else torch.minimum(p, q).sum(-1).mean())
    return agree


# ---- decoding ---------------------------------------------------------------------------------


def _drafts(model: MatFormerLM, target: Setting, request: WidthRequest, auto: bool,
            draft_model: MatFormerLM | None) -> list[Draft]:
    """The draft candidates a request names: a separate model; every runnable tier narrower
    than the target (`auto`); the width `request` names; or by default the smallest tier (at
    most 3). The heads `request` names are the drafts' KV heads, at most the target's in every
    layer (default: the target's heads); heads alone keep the target's FFN widths."""
    base = model.base_width
    if draft_model is not None:
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"the draft model's vocabulary ({draft_model.config.vocab_size}) "
                              f"differs from the target's ({model.config.vocab_size}); draft "
                              f"with a model trained with the same tokenizer")
        return [Draft("draft model", draft_model.widths, draft_model)]
    heads = _draft_kv_heads(model, target, request.heads())
    if auto:
        found = [Draft(describe_widths(base, model.resolve_widths(tier=t)),
                       model.resolve_widths(tier=t), kv_heads=heads)
                 for t in runnable_tiers(base, model.stored_widths, limit=4)]
        found = [d for d in found if sum(d.widths) < sum(target.widths)]
        if not found:
            raise ConfigError(f"no tier narrower than the target "
                              f"({describe_widths(base, target.widths)}) to draft with")
        return found
    if request.names_ffn:
        widths = model.resolve(request.ffn()).widths
    elif request.names_heads:  # fewer heads alone: the target's FFN
        widths = list(target.widths)
    else:
        widths = model.resolve_widths(tier=default_draft_tier(model))
    name = describe_widths(base, widths) + (f", {describe_heads(heads)}"
                                            if request.names_heads else "")
    return [Draft(name, widths, kv_heads=heads)]


def _draft_kv_heads(model: MatFormerLM, target: Setting, request: WidthRequest) -> list[int]:
    """The drafts' KV heads: as `request` names them (at most the target's: they share its
    cache), else the target's."""
    if not request.names_heads:
        return list(target.kv_heads)
    heads = model.resolve(request).kv_heads
    check_heads_held(target.kv_heads, heads, holder="the target", uniform=request.kv_heads,
                     remedy="draft with at most the target's heads (they share its KV cache)")
    return heads


def _draft_lengths(draft_tokens: int | str | None, max_draft_tokens: int,
                   auto: bool) -> tuple[list[int], str]:
    """(the k to choose among, the mode: 'fixed', 'adaptive' or 'auto'); `draft_tokens` None is
    "auto" with an automatic draft (`draft_tier="auto"`), else 4."""
    if draft_tokens is None:
        draft_tokens = "auto" if auto else 4
    if draft_tokens == "adaptive":
        return [min(4, max_draft_tokens)], "adaptive"
    if draft_tokens == "auto":
        return list(range(1, min(AUTO_MAX_DRAFT_TOKENS, max_draft_tokens) + 1)), "auto"
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ConfigError(f"draft_tokens must be a positive integer, 'adaptive' or 'auto', "
                          f"got {draft_tokens!r}")
    return [draft_tokens], "fixed"


@dataclass
class DraftRound:
    """The state the round loop carries: what is drafted with, and the acceptance seen."""

    draft: Draft
    k: int
    mode: str
    prior: dict[str, float]
    seen: dict[str, list[int]] = field(default_factory=dict)
    """draft name -> [accepted, drafted] observed."""
    plain_ok: bool = False
    """Whether the choice may fall back to plain decoding (the draft was chosen too)."""

    def acceptance(self) -> dict[str, float]:
        out = {}
        for name, a0 in self.prior.items():
            acc, dra = self.seen.get(name, [0, 0])
            out[name] = (a0 * PRIOR_WEIGHT + acc) / (PRIOR_WEIGHT + dra)
        return out

    def upper(self) -> dict[str, float]:
        """Each draft's acceptance estimate plus EXPLORE_Z standard errors (binomial, over the
        prior's weight and the drafts observed)."""
        out = {}
        for name, a in self.acceptance().items():
            n = PRIOR_WEIGHT + self.seen.get(name, [0, 0])[1]
            out[name] = min(1.0, a + EXPLORE_Z * math.sqrt(max(a * (1 - a), 1.0 / n) / n))
        return out


def speculative_generate(
    model: MatFormerLM,
    prompt: Sequence[int] | torch.Tensor,
    max_new_tokens: int = 64,
    *,
    draft_tier: int | str | None = None,
    draft_layer_tiers: Sequence[int] | None = None,
    draft_widths: int | Sequence[int] | None = None,
    draft_model: MatFormerLM | None = None,
    draft_tokens: int | str | None = None,
    max_draft_tokens: int = 16,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
    stream: StreamCallback | None = None,
    tier: int | None = None,
    layer_tiers: Sequence[int] | None = None,
    widths: int | Sequence[int] | None = None,
    compile: bool = False,
    costs: DecodeCosts | None = None,
    return_cache: bool = False,
    kv_heads: int | None = None,
    layer_kv_heads: Sequence[int] | None = None,
    draft_kv_heads: int | None = None,
    draft_layer_kv_heads: Sequence[int] | None = None,
) -> GenerationOutput:
    """Speculative decoding: draft, then verify at the target width; see the module docstring.

    Target width: `tier`/`layer_tiers`/`widths`, else the model's current setting. Draft:
    `draft_model` (a separate model with the same vocabulary, at its own widths), or
    `draft_tier`/`draft_layer_tiers`/`draft_widths` of this model, `draft_tier="auto"` for the
    choice among every narrower tier from measured costs, else the smallest tier (at most 3).
    Heads: `kv_heads`/`layer_kv_heads` for the target (else the model's current heads),
    `draft_kv_heads`/`draft_layer_kv_heads` for a draft of this model (at most the target's;
    alone, the draft keeps the target's FFN widths; default: the target's heads).
    `draft_tokens`: k per round; "adaptive" (start at 4; +2 after a round whose drafts were all
    accepted, -1 after a rejection; within 1..`max_draft_tokens`); "auto" (from the costs);
    None: "auto" with `draft_tier="auto"`, else 4. `costs`: reuse costs measured by an earlier call
    (`output.extra["costs"]`) instead of timing again. `compile`: the compiled static-cache
    steps. Output `extra`: "choice" (the last (draft, k) chosen and why) and "costs" when
    chosen from costs, "cache" with `return_cache`.
    """
    target_request = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths,
                                  kv_heads=kv_heads, layer_kv_heads=layer_kv_heads)
    auto = draft_tier == "auto"
    if isinstance(draft_tier, str) and not auto:
        raise ConfigError(f"draft_tier must be a tier (0, 1, ...) or 'auto', got {draft_tier!r}")
    draft_request = WidthRequest(tier=None if auto else draft_tier,  # type: ignore[arg-type]
                                 layer_tiers=draft_layer_tiers, widths=draft_widths,
                                 kv_heads=draft_kv_heads, layer_kv_heads=draft_layer_kv_heads)
    if auto and draft_request.names_ffn:
        raise ConfigError("draft_tier='auto' chooses the draft width; drop draft_layer_tiers / "
                          "draft_widths")
    device = model.model.embed_tokens.weight.device
    sampler, eos = sampler_and_eos(model, device, temperature, top_k, top_p, seed, eos_token_id,
                                   ignore_eos)
    return _speculative(model, prompt, max_new_tokens, target_request, draft_request, auto,
                        draft_model, draft_tokens, max_draft_tokens, sampler, eos, stream=stream,
                        compile=compile, costs=costs, return_cache=return_cache)


def _speculative(model: MatFormerLM, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int,
                 target_request: WidthRequest, draft_request: WidthRequest, auto: bool,
                 draft_model: MatFormerLM | None, draft_tokens: int | str | None,
                 max_draft_tokens: int, sampler: Sampler, eos: set[int], *,
                 stream: StreamCallback | None, compile: bool, costs: DecodeCosts | None,
                 return_cache: bool) -> GenerationOutput:
    """`speculative_generate` with the target's and the draft's widths as one request each
    (`auto`: the draft is chosen among the narrower tiers) and the sampler built."""
    device = model.model.embed_tokens.weight.device
    ids = prompt_ids(prompt, device, model.config.vocab_size)  # (1, P)
    max_len = check_lengths(model, ids.shape[1], max_new_tokens)
    ks, mode = _draft_lengths(draft_tokens, max_draft_tokens, auto)
    target = model.resolve(target_request, current=True)
    drafts = _drafts(model, target, draft_request, auto, draft_model)
    choose = mode == "auto" or len(drafts) > 1
    stats, extra = GenerationStats(prompt_tokens=ids.shape[1]), {}
    # running() restores the caller's setting on exit, whatever draft/target switching happened.
    with model.running(target), torch.inference_mode():
        t0 = time.perf_counter()
        dec = static_decoder(model, 1, max_len, compile=compile)
        draft_decs = _draft_decoders(drafts, max_len, compile)
        cur = _prefill(dec, draft_decs, ids, stats)  # (1, 1): emitted, not yet in the cache
        state = DraftRound(drafts[0], ks[0], mode, {d.name: 0.0 for d in drafts},
                       plain_ok=auto)
        if choose:
            costs = _first_choice(model, dec, draft_decs, ids, target, drafts, ks, sampler, state,
                                  costs, extra)
        stats.prefill_seconds = time.perf_counter() - t0
        out = _rounds(model, dec, draft_decs, cur, state, target, sampler, eos, max_new_tokens,
                      stats, stream, ks if choose else None, costs, drafts, extra)
        sync_device(device)
        stats.seconds = time.perf_counter() - t0
    stats.new_tokens = len(out)
    if return_cache:
        extra["cache"] = dec.finish()
    return GenerationOutput(tokens=out, prompt=ids[0].tolist(), widths=list(target.widths),
                            stats=stats, draft_widths=list(state.draft.widths), extra=extra,
                            kv_heads=list(target.kv_heads), draft_kv_heads=state.draft.kv_heads)


def _first_choice(model: MatFormerLM, dec: StaticDecoder, draft_decs: dict[str, StaticDecoder],
                  ids: torch.Tensor, target: Setting, drafts: list[Draft],
                  ks: Sequence[int], sampler: Sampler, state: DraftRound, costs: DecodeCosts | None,
                  extra: dict[str, Any]) -> DecodeCosts:
    """The first (draft, k) choice, from the prompt's agreement and the costs (measured now
    unless `costs` cover every draft and k); returns the costs (also in `extra["costs"]`)."""
    state.prior = prompt_agreement(model, ids, target, drafts, sampler)
    if not _covers(costs, drafts, ks):
        costs = measure_costs(model, dec, target, drafts, draft_decs, ks)
    rechoose_draft(state, drafts, costs, ks, extra)
    extra["costs"] = costs
    return costs


def _covers(costs: DecodeCosts | None, drafts: Sequence[Draft], ks: Sequence[int]) -> bool:
    """Whether `costs` hold a step for every draft and a verify for every k."""
    return (costs is not None and all(d.name in costs.draft_steps for d in drafts)
            and all(k in costs.verify for k in ks))


def _draft_decoders(drafts: Sequence[Draft], max_len: int,
                    compile: bool) -> dict[str, StaticDecoder]:
    """A cache for each separate draft model (widths of the target share its cache)."""
    return {d.name: static_decoder(d.model, 1, max_len, compile=compile)
            for d in drafts if d.model is not None}


def _prefill(dec: StaticDecoder, draft_decs: dict[str, StaticDecoder], ids: torch.Tensor,
             stats: GenerationStats) -> torch.Tensor:
    """Write every prompt token but the last into the target's cache (and each separate draft
    model's); returns that last token (1, 1), emitted but not yet in the caches."""
    for d in (dec, *draft_decs.values()):
        d.pos = 0
        d.pad.zero_()
        if ids.shape[1] > 1:
            d.prefill([ids[0, :-1]])
    if ids.shape[1] > 1:
        stats.target_forwards += 1
    return ids[:, -1:]


def rechoose_draft(state: DraftRound, drafts: Sequence[Draft], costs: DecodeCosts, ks: Sequence[int],
              extra: dict[str, Any]) -> None:
    """Pick (draft, k) from the costs at the acceptance seen so far. With k and the draft chosen
    (`draft_tier="auto"`) and no pair expected to beat plain decoding, k = 0: each round is one
    target step; a named draft drafts at its best k even then."""
    auto = state.mode == "auto"
    choice = choose_draft(costs, state.acceptance(), ks if auto else [state.k],
                          allow_plain=auto and state.plain_ok)
    if auto:  # explore: a little-observed draft whose optimistic acceptance would beat the choice
        upper = state.upper()
        others = [choose_draft(costs, {n: upper[n]}, ks, allow_plain=False)
                  for n in upper if n != choice.draft
                  and state.seen.get(n, [0, 0])[1] < PRIOR_WEIGHT]
        best = max(others, key=lambda c: c.expected_speedup, default=None)
        if best is not None and best.expected_speedup > choice.expected_speedup:
            choice = replace(best, explore=True)
    extra["choice"] = choice
    if choice.draft is None:
        state.k = 0
        return
    state.draft = next(d for d in drafts if d.name == choice.draft)
    state.k = choice.k


def _rounds(model: MatFormerLM, dec: StaticDecoder, draft_decs: dict[str, StaticDecoder],
            cur: torch.Tensor, state: DraftRound, target: Setting, sampler: Sampler,
            eos: set[int],
            max_new_tokens: int, stats: GenerationStats, stream: StreamCallback | None,
            ks: Sequence[int] | None, costs: DecodeCosts | None, drafts: Sequence[Draft],
            extra: dict[str, Any]) -> list[int]:
    """Draft-verify rounds until EOS or `max_new_tokens`; `ks`: re-choose after each round."""
    out: list[int] = []
    while stats.stop_reason != "eos" and len(out) < max_new_tokens:
        start = dec.pos
        # One token always comes from the verifier, so at most remaining-1 drafts count.
        kk = min(state.k, max_new_tokens - len(out) - 1)
        ddec = draft_decs.get(state.draft.name)
        drafts_, q_rows = _draft(model, dec, ddec, cur, kk, state.draft, sampler, stats)
        model.apply(target)
        block = torch.cat([cur, *drafts_], dim=1)  # (1, kk+1): cur, d1..dk
        p_logits = dec.forward(block)[0]  # (kk+1, V)
        stats.target_forwards += 1
        n, new = _verify(sampler, p_logits, block[0, 1:], q_rows)
        stats.drafted += kk
        stats.accepted += n
        dec.crop(start + 1 + n)  # keep the verifier's entries for cur and the n accepted
        if ddec is not None:
            _sync_draft(ddec, block, start, n, kk, stats)
        new = _emit(new, eos, max_new_tokens - len(out), stats)
        out.extend(new)
        if stream is not None and new:
            stream(new)
        cur = torch.tensor([[new[-1]]], device=dec.device)
        seen = state.seen.setdefault(state.draft.name, [0, 0])
        seen[0] += n
        seen[1] += kk
        if state.mode == "adaptive":
            state.k = (min(state.k + 2, 16) if n == kk and kk > 0 else max(1, state.k - 1))
        elif ks is not None and costs is not None:
            rechoose_draft(state, drafts, costs, ks, extra)
    return out


def _sync_draft(ddec: StaticDecoder, block: torch.Tensor, start: int, n: int, kk: int,
                stats: GenerationStats) -> None:
    """A separate draft model's cache to the accepted prefix: it holds cur, d1..d(kk-1) from
    drafting; when all kk were accepted it still lacks dk, which is fed now."""
    if n < kk:
        ddec.crop(start + 1 + n)
    else:
        ddec.forward(block[:, -1:])
        stats.draft_forwards += 1


def _draft(model: MatFormerLM, dec: StaticDecoder, ddec: StaticDecoder | None, cur: torch.Tensor,
           kk: int, draft: Draft, sampler: Sampler,
           stats: GenerationStats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Draft `kk` tokens after `cur`. At a width of the target model the entries are temporary
    (the shared cache is cropped back); a separate model keeps its own (`ddec`). Returns the
    drafts ((1, 1) each) and, when sampling, the processed draft distributions ((V,) each)."""
    drafts: list[torch.Tensor] = []
    q_rows: list[torch.Tensor] = []
    if kk == 0:
        return drafts, q_rows
    start = dec.pos
    if ddec is None:
        model.apply(draft.setting)
    step = ddec or dec
    tok = cur
    for _ in range(kk):
        q_logits = step.step(tok)[0]  # (V,)
        stats.draft_forwards += 1
        if sampler.greedy:
            tok = q_logits.argmax(-1).view(1, 1)
        else:
            q = sampler.probs(q_logits)
            q_rows.append(q)
            tok = sampler.draw(q).view(1, 1)
        drafts.append(tok)
    if ddec is None:
        dec.crop(start)
    return drafts, q_rows


def _verify(sampler: Sampler, p_logits: torch.Tensor, d: torch.Tensor,
            q_rows: list[torch.Tensor]) -> tuple[int, list[int]]:
    """The verifier's decision on drafts `d` (kk,) from its logits (kk+1, V): (accepted count
    n, the tokens to emit: d[:n] and one token of the verifier's own)."""
    kk = d.shape[0]
    if sampler.greedy:
        best = p_logits.argmax(-1)  # (kk+1,)
        agree = (best[:kk] == d).tolist()
        n = agree.index(False) if False in agree else kk
        return n, d[:n].tolist() + [int(best[n])]
    p = sampler.probs(p_logits)  # (kk+1, V)
    if kk == 0:
        return 0, [int(sampler.draw(p[0]))]
    q = torch.stack(q_rows)  # (kk, V)
    rows = torch.arange(kk, device=p.device)
    p_d, q_d = p[rows, d], q[rows, d]
    # accept d_i with probability min(1, p/q): u*q <= p avoids dividing
    ok = (sampler.uniform(kk, p.device) * q_d <= p_d).tolist()
    n = ok.index(False) if False in ok else kk
    if n < kk:
        resid = (p[n] - q[n]).clamp_min(0.0)
        total = resid.sum()
        # p == q exactly leaves no residual (and rejection had probability 0)
        last = int(sampler.draw(resid / total if float(total) > 0 else p[n]))
    else:
        last = int(sampler.draw(p[kk]))
    return n, d[:n].tolist() + [last]


def _emit(new: list[int], eos: set[int], room: int, stats: GenerationStats) -> list[int]:
    """`new` cut after the first EOS (recorded as the stop reason) and to `room` tokens."""
    for j, t in enumerate(new):
        if t in eos:
            new = new[: j + 1]
            stats.stop_reason = "eos"
            break
    return new[:room]

