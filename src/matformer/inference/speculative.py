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
(teacher-forced, one forward each: over the first tokens decoded with `auto`, see below; over
the prompt otherwise) and follows the acceptance observed as rounds
go, the choice re-made after every round from the same costs. Only the draft in use is
observed, so a draft whose few-token prompt agreement was low by chance is tried (`explore`)
while its optimistic acceptance (EXPLORE_Z standard errors up) would win, until it has drafted
PRIOR_WEIGHT tokens.

`auto` is never slower than plain decoding by more than noise (issue 28): the costs are of what
a round runs (a draft step with its argmax, a verify with its concatenation, argmax and
read-back), plain decoding's own step is timed as `generate` runs it (`plain_step`: eagerly
that is the growing-cache forward, not the static one), and each round's wall time is
compared with what the costs predicted for it: a draft whose rounds run slower than predicted
has its costs scaled by the observed ratio (`DraftRound.slowdown`) before the next choice, so a
draft that does not pay is dropped after a round or two and decoding goes on plainly. When
even fully accepted drafts could not beat a plain step (the costs alone decide: no prompt
forward, no draft forward), `auto` runs plain decoding itself, `generate`, at no extra cost.
Costs are measured once per process for a (model, target, drafts, compile) and reused
(`cached_costs`).

Its first call costs nothing measurable either when no draft can pay (issue 28: it used to time
every draft and verify and the prompt agreement before its first token, 0.5x of plain decoding
on SmolLM2-135M). With no costs measured, `auto` decides from the cheapest evidence first:
1. parameter counts: at ideal costs (a draft step at its share of a step's multiply-adds,
   `step_work`, which counts the output layer that does not shrink with the FFN; any verify as
   cheap as one step) and every draft accepted, if no draft beats plain decoding by
   PAY_MARGIN, `auto` is `generate` itself (no timing: the bound is a ratio);
2. the plain start: it decodes PROBE_TOKENS tokens plainly, as `generate` does (the tokens the
   user wanted anyway), then runs the widest draft once over them, teacher-forced on the
   target's cache (`probe_agreement`; the target's entries are put back). Its agreement, a few
   standard errors up (`acceptance_bound`), bounds every draft's acceptance (a narrower width
   agrees no more, as a rule); at ideal costs, if no draft would beat PAY_MARGIN, decoding
   goes on plainly on the same cache: one draft forward more than `generate`, same tokens
   (sampled ones too: the probe draws nothing). Later calls reuse the probes' verdict
   (`generate` itself) and probe again every REPROBE_EVERY-th call;
3. only when the bound leaves room for a draft are the costs timed (and kept), every draft's
   agreement over the plain start taken as its prior, and rounds start from there.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from matformer.errors import ConfigError
from matformer.inference.compile_cache import compile_stats, precompile_seconds
from matformer.inference.decode import generate, static_decoder
from matformer.inference.half_on_cpu import half_on_cpu
from matformer.inference.sampling import (
    GenerationOutput,
    GenerationStats,
    Sampler,
    StreamCallback,
    check_lengths,
    default_draft_tier,
    emit_token,
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

PLAIN_PROBE_EVERY = 16
"""With a draft chosen by `auto`, every this many rounds one is a plain step, timed: what the
draft's rounds are compared with is plain decoding as it runs now, not only as timed once."""

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
    plain_step: float = 0.0
    """One token of plain decoding as `generate` runs it (its step and its pick); 0: not
    measured, `target_step` stands for it."""
    measured_ks: list[int] = field(default_factory=list)
    """The k whose verify was timed (the others interpolated between them; empty: all)."""
    observed: Observed = field(default_factory=lambda: Observed(), compare=False, repr=False)
    """What `auto` calls that used these costs saw their rounds and plain steps take."""

    @property
    def plain(self) -> float:
        """Seconds per token of plain decoding, what every draft is compared with."""
        return self.plain_step or self.target_step

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("observed")
        return d


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
    reason: str = ""
    """Why, in words (the eval table and the summary line print it)."""

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


def round_seconds(costs: DecodeCosts, name: str, k: int) -> float:
    """What the costs predict a round of k drafts by `name` takes."""
    return k * costs.draft_steps[name] + costs.verify[k]


def choose_draft(costs: DecodeCosts, acceptance: dict[str, float],
                 ks: Sequence[int] | None = None, *, allow_plain: bool = True,
                 slowdown: dict[str, float] | None = None,
                 plain: float | None = None) -> DraftChoice:
    """The (draft, k) of the highest expected speed-up over plain decoding (`costs.plain` a
    token) among the drafts in `acceptance` and the k in `ks` (default every k `costs.verify`
    holds), each draft's rounds `slowdown[name]` times as long as the costs predict (observed;
    default 1), against `plain` seconds a plain token (observed; default `costs.plain`); with
    `allow_plain`, plain decoding (draft None, speed-up 1) when no pair is expected to beat it
    by PAY_MARGIN."""
    base = plain or costs.plain
    best = DraftChoice(None, 0, 0.0, 1.0, PAY_MARGIN if allow_plain else 0.0,
                       reason=f"no draft expected to pay {PAY_MARGIN:.2g}x")
    for name, alpha in acceptance.items():
        slow = (slowdown or {}).get(name, 1.0)
        for k in ks if ks is not None else sorted(costs.verify):
            gain = expected_tokens(alpha, k) / (round_seconds(costs, name, k) * slow) * base
            if gain > best.expected_speedup:
                best = DraftChoice(name, k, alpha, expected_tokens(alpha, k), gain,
                                   reason=f"expected {gain:.2f}x at acceptance "
                                          f"{100 * alpha:.0f}%"
                                          + (f", rounds {slow:.2f}x the costs' time"
                                             if slow != 1.0 else ""))
    return best if best.draft is not None else replace(best, expected_speedup=1.0)


def can_pay(costs: DecodeCosts, names: Sequence[str], ks: Sequence[int],
            seen: Observed | None = None) -> bool:
    """Whether any draft could beat plain decoding by PAY_MARGIN even with every draft accepted
    (its rounds and plain steps as `seen` by earlier calls, when given): when not, no acceptance
    estimate (no prompt forward) is needed to choose plain decoding."""
    state = DraftRound(Draft("", []), 0, "auto", dict.fromkeys(names, 1.0))
    if seen is not None:
        seen.seed(state)
    return choose_draft(costs, dict.fromkeys(names, 1.0), ks, slowdown=state.slowdown(),
                        plain=state.plain_step()).draft is not None


PROBE_TOKENS = 8
"""Plain tokens `auto` decodes first when it has nothing measured to choose by (its first call
in a process, or costs that say a draft could pay): their steps time plain decoding, and the
widest draft's agreement with them (one forward over them) bounds every draft's acceptance."""

PAY_MARGIN = 1.2
"""The speed-up over plain decoding a draft must be expected to give before `auto` drafts with
it, explores it, or (at ideal costs and the probe's acceptance bound) spends time measuring what
drafts really cost. Not 1.0: what the choice rests on (single plain steps timed between rounds,
a few rounds' wall time and acceptance, a prior from 8 tokens) each err by 10-20% on a noisy
machine, and a call's choosing costs about 5% of it. With 1.0 (1.1 at ideal costs), on the
demo's eval table (eager; drafts at 0.7-0.9 of a step, so at most 1.1-1.15x even fully
accepted) `auto` explored each draft in every call and drafted at 0.76-0.92x of plain
decoding in 13 of 42 timed runs (five variants of the acceptance count and of the plain step's
estimate, none of which removed it), with the margin in none of 11; where drafting pays
(the 41.7M benchmark model, compiled: 1.5-1.8x expected) it changes nothing."""


def step_work(model: MatFormerLM, setting: Setting) -> int:
    """Multiply-adds of one decoding step at `setting`, per token: every non-embedding
    parameter plus the output layer (vocabulary x hidden, tied or not; the embedding lookup is
    free). A draft's step costs at least this fraction of the target's on any machine where
    decoding reads every weight once (memory-bound) or multiplies by it once (compute-bound)."""
    cfg = model.config
    return (model.num_parameters_at(setting.widths, setting.kv_heads or None)["non_embedding"]
            + cfg.vocab_size * cfg.hidden_size)


def ideal_costs(model: MatFormerLM, target: Setting, drafts: Sequence[Draft], ks: Sequence[int],
                plain_step: float) -> DecodeCosts:
    """Costs no real decoding beats, from one observed plain step: each draft step at its
    `step_work` fraction of it, every verify (k+1 tokens) as cheap as one step. A draft that
    cannot pay at these costs cannot pay at the real ones."""
    full = step_work(model, target)
    steps = {d.name: plain_step * step_work(model, d.setting) / full for d in drafts}
    return DecodeCosts(plain_step, steps, dict.fromkeys(ks, plain_step), plain_step=plain_step)


def ideal_best(model: MatFormerLM, target: Setting, drafts: Sequence[Draft], ks: Sequence[int],
               acceptance: float, plain_step: float = 1.0) -> DraftChoice:
    """The best (draft, k) at `ideal_costs` (relative to `plain_step`) with every draft's
    acceptance `acceptance`: what no real decoding at that acceptance beats."""
    return choose_draft(ideal_costs(model, target, drafts, ks, plain_step),
                        dict.fromkeys([d.name for d in drafts], acceptance), ks,
                        allow_plain=False)


def succession(agreed: float, n: int) -> float:
    """An acceptance prior from the fraction `agreed` of `n` teacher-forced tokens, by the rule
    of succession ((agreed n + 1) / (n + 2)): a few agreeing tokens are not certainty. The
    prior weighs PRIOR_WEIGHT drafted tokens, more than the 8 of a prompt's tail; taken as it
    stood, 8 of 8 made every draft of the demo's model look certain, and `draft_tier="auto"`
    drafted 8 at a time at 67-88% acceptance (see PAY_MARGIN)."""
    return (agreed * n + 1.0) / (n + 2.0)


def acceptance_bound(agreed: float, n: int, z: float = EXPLORE_Z) -> float:
    """An optimistic acceptance from `agreed` of `n` probed tokens: the estimate plus `z`
    standard errors (binomial; at least the error of one token in n, so 0 of n is not
    certainty)."""
    a = agreed / n
    return min(1.0, a + z * math.sqrt(max(a * (1 - a), 1.0 / n) / n))


DECAY = 0.5
"""What earlier calls saw weighs this much less after each call (`Observed`)."""


@dataclass
class Observed:
    """What earlier calls of this process saw their rounds and plain steps take (for a costs
    key): a later call starts from it, so a draft that did not pay is not tried again on every
    prompt (and `auto` then runs `generate` itself). Its sums are halved after every call, so it
    follows the machine as it changes. Kept on the `DecodeCosts` it is relative to."""

    timed: dict[str, list[float]] = field(default_factory=dict)
    plain_timed: list[float] = field(default_factory=lambda: [0.0, 0.0])
    accepted: dict[str, list[float]] = field(default_factory=dict)
    """draft name -> [accepted, counted] of earlier calls' rounds (`DraftRound.seen`, halved
    after each call): a later call's first prior, in place of measuring the prompt's
    agreement."""

    def prior(self, drafts: Sequence[Draft]) -> dict[str, float] | None:
        """Each draft's acceptance in earlier calls, once every draft has PRIOR_WEIGHT drafted
        tokens behind it; else None."""
        seen = [self.accepted.get(d.name, [0.0, 0.0]) for d in drafts]
        if any(dra < PRIOR_WEIGHT for _, dra in seen):
            return None
        return {d.name: acc / dra for d, (acc, dra) in zip(drafts, seen, strict=True)}

    def absorb_acceptance(self, state: DraftRound) -> None:
        """Add what `state`'s rounds accepted, earlier calls weighing half each time."""
        for name, (acc, dra) in state.seen.items():
            old = self.accepted.get(name, [0.0, 0.0])
            self.accepted[name] = [DECAY * (old[0] + acc), DECAY * (old[1] + dra)]

    def seed(self, state: DraftRound) -> None:
        state.timed = {n: list(v) for n, v in self.timed.items()}
        state.plain_timed = list(self.plain_timed)

    def absorb(self, state: DraftRound) -> None:
        """Keep what `state` saw (its seed included), earlier calls weighing half each time."""
        self.timed = {n: [DECAY * t, DECAY * p] for n, (t, p) in state.timed.items()}
        self.plain_timed = [DECAY * x for x in state.plain_timed]


# ---- measuring ----------------------------------------------------------------------------------


def timed_together(fns: dict[Any, tuple[Callable[[], None], Callable[[], None]]],
                    device: torch.device, reps: int, warm: bool) -> dict[Any, float]:
    """Seconds of each of `fns` (key -> (set-up, untimed; the run, timed)): the least of `reps`
    runs, the runs interleaved (one of each, then again), after one warm-up run each (which
    compiles) when `warm` (here and for the server's costs). On a shared machine
    load only ever adds time, and interleaving spreads a burst over every quantity alike, so
    the ratios the choice rests on stay close to the idle machine's."""
    if warm:
        for setup, fn in fns.values():
            setup()
            fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(reps):
        for key, (setup, fn) in fns.items():
            setup()
            sync_device(device)
            t0 = time.perf_counter()
            fn()
            sync_device(device)
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def verify_points(ks: Sequence[int]) -> list[int]:
    """The k whose verify is timed (here and by the server): the smallest, the largest and the
    powers of two between; the verify of the others is interpolated (its cost is close to
    linear in the tokens)."""
    return sorted({ks[0], ks[-1], *(k for k in ks if k & (k - 1) == 0)})


def interpolate_verify(points: dict[int, float], ks: Sequence[int]) -> dict[int, float]:
    """`points` (k -> seconds) extended to every k in `ks`, linearly between timed points
    (beyond them: the nearest)."""
    xs = sorted(points)
    out = {}
    for k in ks:
        lo = max((x for x in xs if x <= k), default=xs[0])
        hi = min((x for x in xs if x >= k), default=xs[-1])
        w = 0.0 if hi == lo else (k - lo) / (hi - lo)
        out[k] = points[lo] + w * (points[hi] - points[lo])
    return out


def measure_costs(model: MatFormerLM, dec: StaticDecoder, target: Setting,
                  drafts: Sequence[Draft], draft_decs: dict[str, StaticDecoder],
                  ks: Sequence[int], reps: int = 3, *, prune: bool = False) -> DecodeCosts:
    """Time, at `dec`'s position (every forward is cropped away again; the least of `reps`
    interleaved runs), what decoding runs:
    plain decoding's step as `generate` runs it, a target step, each draft's step with its
    argmax, and the verify of k+1 tokens with its concatenation, argmax and read-back, for the
    smallest k, the largest and the powers of two between (the rest interpolated; those past
    the smallest timed in a second batch, beside the smallest again, whose two timings set
    their scale to the first batch's). `prune`:
    when no draft could pay even fully accepted with the smallest verify, the other verifies
    are not timed (every k gets the smallest's: a lower bound). The model is left at `target`."""
    t0 = time.perf_counter()
    pos, warm = dec.pos, dec.compiled  # eager: nothing to compile
    one = torch.zeros(1, 1, dtype=torch.long, device=dec.device)
    tails = {k: torch.zeros(1, k, dtype=torch.long, device=dec.device) for k in ks}

    def step(d: StaticDecoder) -> None:
        at = d.pos
        d.step(one).argmax(-1).view(1, 1)
        d.crop(at)

    def verify(k: int) -> None:
        model.apply(target)
        block = torch.cat([one, tails[k]], dim=1)
        dec.forward(block)[0].argmax(-1).tolist()
        dec.crop(pos)

    def at(setting: Setting | None, fn: Callable[[], None]) -> tuple[Callable[[], None],
                                                                       Callable[[], None]]:
        return ((lambda: model.apply(setting)) if setting is not None else (lambda: None)), fn

    fns: dict[Any, tuple[Callable[[], None], Callable[[], None]]] = {
        "target": at(target, lambda: step(dec))}
    if not dec.compiled:
        fns["plain"] = at(target, _eager_plain_step(model, pos, dec.device))
    for d in drafts:
        fns[d.name] = (at(d.setting, lambda: step(dec)) if d.model is None
                       else at(None, lambda d=d: step(draft_decs[d.name])))
    points = verify_points(ks)
    fns[("verify", points[0])] = at(None, lambda: verify(points[0]))
    first = timed_together(fns, dec.device, reps, warm)
    target_step = first["target"]
    plain_step = first.get("plain", target_step)
    steps = {d.name: first[d.name] for d in drafts}
    timed = {points[0]: first[("verify", points[0])]}
    partial = DecodeCosts(target_step, steps, dict.fromkeys(ks, timed[points[0]]),
                          plain_step=plain_step)
    if len(points) > 1 and not (prune and not can_pay(partial, list(steps), ks)):
        # timed apart from the first batch, so the smallest verify is timed again beside them
        # and the others are taken at the first batch's scale: a burst of load over this batch
        # alone would otherwise price k >= 2 against the steps at that burst's rate
        more = timed_together({k: at(None, lambda k=k: verify(k)) for k in points},
                               dec.device, reps, warm)
        scale = timed[points[0]] / more[points[0]]
        timed.update({k: more[k] * scale for k in points[1:]})
    model.apply(target)
    return DecodeCosts(target_step, steps, interpolate_verify(timed, ks), pos,
                       time.perf_counter() - t0, plain_step=plain_step,
                       measured_ks=sorted(timed))


def _eager_plain_step(model: MatFormerLM, pos: int, device: torch.device) -> Callable[[], None]:
    """One step of `generate`'s eager loop at position `pos` (its growing cache slice and its
    pick), on a scratch cache: what plain decoding costs a token eagerly."""
    cache = model.new_cache(1, pos + 1)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)

    def run() -> None:
        cache.length = pos
        int(model(tok, cache=cache)[0, -1].argmax(-1))

    return run


_COSTS: weakref.WeakKeyDictionary[MatFormerLM, dict[tuple, DecodeCosts]] = (
    weakref.WeakKeyDictionary())


def _costs_key(model: MatFormerLM, target: Setting, drafts: Sequence[Draft], compile: bool,
               ks: Sequence[int]) -> tuple:
    """What the costs of a call depend on besides the machine: the target and draft settings,
    a separate draft model, compilation, the dtype and device."""
    w = model.model.embed_tokens.weight
    return (tuple(target.widths), tuple(target.kv_heads), compile, str(w.dtype), str(w.device),
            tuple((d.name, tuple(d.widths), tuple(d.kv_heads or [])) for d in drafts),
            tuple(ks))


def cached_costs(model: MatFormerLM, key: tuple) -> DecodeCosts | None:
    """The costs measured earlier in this process for `key` (`_costs_key`), if any."""
    return _COSTS.get(model, {}).get(key)


REPROBE_EVERY = 8
"""`auto` calls in a row that reuse the earlier probes' verdict "no draft can pay" (running
`generate` itself) before one probes again: prompts change, and with them the agreement."""


@dataclass
class Probed:
    """What `auto`'s probes in this process saw (per costs key and sampler): the widest draft's
    agreement and the tokens probed, earlier probes weighing DECAY less at each new one, and
    the calls since the last probe."""

    draft: str = ""
    agreed: float = 0.0
    tokens: float = 0.0
    calls: int = 0

    def add(self, draft: str, agreed: float, tokens: int) -> None:
        self.draft = draft
        self.agreed = DECAY * self.agreed + agreed
        self.tokens = DECAY * self.tokens + tokens
        self.calls = 0


_PROBED: weakref.WeakKeyDictionary[MatFormerLM, dict[tuple, Probed]] = (
    weakref.WeakKeyDictionary())


def _probed(model: MatFormerLM, key: tuple, sampler: Sampler) -> Probed:
    """The probe record of `key` under `sampler` (agreement under sampling is another
    quantity than greedy agreement), created empty."""
    skey = (key, sampler.greedy, sampler.temperature, sampler.top_k, sampler.top_p)
    return _PROBED.setdefault(model, {}).setdefault(skey, Probed())


def _keep_costs(model: MatFormerLM, key: tuple, costs: DecodeCosts,
                drafts: Sequence[Draft]) -> None:
    """Keep `costs` for later calls (not with a separate draft model: it is not part of the
    key, and another model may take its place)."""
    if all(d.model is None for d in drafts):
        _COSTS.setdefault(model, {})[key] = costs


def prompt_agreement(model: MatFormerLM, ids: torch.Tensor, target: Setting,
                     drafts: Sequence[Draft], sampler: Sampler) -> dict[str, float]:
    """Each draft's acceptance probability estimated on the prompt `ids` (1, P), teacher-forced:
    greedy, the fraction of positions whose argmax equals the target's; sampling, the mean of
    sum_v min(p, q) (the probability the rule accepts a draft token)."""
    def dist(m: MatFormerLM, setting: Setting | None) -> torch.Tensor:
        # a prompt's forward, read as generate reads one (a float16 model's on the CPU in
        # float32: PyTorch's float16 products of many rows there were 0.35 s of a 64-token
        # speculative call on the 41.7M benchmark model, against 0.09 s for its whole prefill)
        with (m.running(setting) if setting is not None else contextlib.nullcontext(),
              half_on_cpu(m)):
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
    """draft name -> [accepted, counted] observed. A named draft (no plain fallback) counts the
    drafts the verifier judged, the accepted ones and a round's first rejected: the per-draft
    acceptance `expected_tokens` takes (the ones after a rejection were never tested; counting
    them as rejected put a tier-3 draft accepted 90% of the time at about 80% once k was 3, and
    k then stayed at 1). `draft_tier="auto"` counts every drafted token, a lower estimate that
    errs toward plain decoding where drafting is marginal (timed runs of the demo's eval table
    could not tell the two apart: `auto` drafted at a loss in 2 of 5 runs with the judged
    count, 5 of 17 with this one, in the same hour)."""
    plain_ok: bool = False
    """Whether the choice may fall back to plain decoding (the draft was chosen too)."""
    timed: dict[str, list[float]] = field(default_factory=dict)
    """draft name -> [seconds its rounds took, seconds the costs predicted for them]."""
    plain_timed: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """[seconds, tokens] of the plain steps taken between rounds (`plain_ok`): plain
    decoding's own cost, observed in the same stretch of time as the rounds it is compared
    with (a busy machine slows both)."""
    rounds: int = 0

    def plain_step(self) -> float | None:
        """Seconds a plain token took, observed (None: not yet)."""
        took, n = self.plain_timed
        return took / n if n else None

    def probe_plain(self) -> bool:
        """Whether this round is a plain step, taken to observe plain decoding (a token like any
        other): rounds 2 and 4, then every PLAIN_PROBE_EVERY-th, while a draft is in use."""
        return (self.plain_ok and self.k > 0 and self.mode == "auto"
                and (self.rounds in (2, 4) or self.rounds % PLAIN_PROBE_EVERY == 0))

    def slowdown(self) -> dict[str, float]:
        """Each observed draft's rounds' wall time over what the costs predicted for them: the
        per-round work the step costs do not hold (Python, concatenation, reads, switches)."""
        took = sum(t for t, _ in self.timed.values())
        predicted = sum(p for _, p in self.timed.values())
        overall = took / predicted if predicted > 0 else 1.0  # for a draft not yet observed
        return {n: (self.timed[n][0] / self.timed[n][1]
                    if n in self.timed and self.timed[n][1] > 0 else overall)
                for n in self.prior}

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

    def plain(target: Setting) -> GenerationOutput:
        """Plain decoding at `target`, as `generate` runs it (`auto` chose it)."""
        return generate(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, eos_token_id=eos_token_id, ignore_eos=ignore_eos,
                        stream=stream, widths=target.widths, layer_kv_heads=target.kv_heads,
                        compile=compile)

    return _speculative(model, prompt, max_new_tokens, target_request, draft_request, auto,
                        draft_model, draft_tokens, max_draft_tokens, sampler, eos, stream=stream,
                        compile=compile, costs=costs, return_cache=return_cache,
                        plain=None if return_cache else plain)


def _speculative(model: MatFormerLM, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int,
                 target_request: WidthRequest, draft_request: WidthRequest, auto: bool,
                 draft_model: MatFormerLM | None, draft_tokens: int | str | None,
                 max_draft_tokens: int, sampler: Sampler, eos: set[int], *,
                 stream: StreamCallback | None, compile: bool, costs: DecodeCosts | None,
                 return_cache: bool,
                 plain: Callable[[Setting], GenerationOutput] | None = None) -> GenerationOutput:
    """`speculative_generate` with the target's and the draft's widths as one request each
    (`auto`: the draft is chosen among the narrower tiers) and the sampler built. `plain`:
    plain decoding at a setting, run when `auto` chooses it before decoding starts."""
    device = model.model.embed_tokens.weight.device
    ids = prompt_ids(prompt, device, model.config.vocab_size)  # (1, P)
    max_len = check_lengths(model, ids.shape[1], max_new_tokens)
    ks, mode = _draft_lengths(draft_tokens, max_draft_tokens, auto)
    target = model.resolve(target_request, current=True)
    drafts = _drafts(model, target, draft_request, auto, draft_model)
    choose = mode == "auto" or len(drafts) > 1
    if choose:  # a verify of k+1 tokens after the prompt must fit the context to be timed
        ctx = model.config.max_position_embeddings
        ks = [k for k in ks if ids.shape[1] + k <= ctx] or ks[:1]
    key = _costs_key(model, target, drafts, compile, ks)
    if choose and not _covers(costs, drafts, ks):
        costs = cached_costs(model, key)
    seen = costs.observed if auto and costs is not None else None
    if (auto and plain is not None and costs is not None and _covers(costs, drafts, ks)
            and not can_pay(costs, [d.name for d in drafts], ks, seen)):
        # Not even fully accepted drafts would pay: plain decoding itself, nothing else run.
        return _chose_plain(plain(target), costs, 0.0,
                            "no draft pays even if every draft is accepted"
                            + (", as earlier calls' rounds ran" if seen and seen.timed else ""))
    # No costs that settle it: decode plainly first and look at the drafts from there (widths
    # of the target only: a separate draft model would need its own prompt forward).
    # (and room to time the longest verify after the plain start, in the context)
    plain_first = (auto and plain is not None and all(d.model is None for d in drafts)
                   and ids.shape[1] + PROBE_TOKENS + max(ks)
                   <= model.config.max_position_embeddings)
    if plain_first and not _covers(costs, drafts, ks):
        # The cheapest bound first: ideal costs (a draft step at its share of the work, any
        # verify as cheap as one step) are relative to a plain step, so no timing is needed.
        ideal = ideal_best(model, target, drafts, ks, 1.0)
        if ideal.expected_speedup < PAY_MARGIN:
            return _chose_plain(plain(target), None, 0.0,
                                f"no draft can pay even if every draft is accepted: at ideal "
                                f"costs the best would be {ideal.expected_speedup:.2f}x")
        probed = _probed(model, key, sampler)
        if probed.tokens and probed.calls < REPROBE_EVERY - 1:
            # Earlier calls' probes: when they rule every draft out, this call probes nothing.
            bound = acceptance_bound(probed.agreed, round(probed.tokens))
            best = ideal_best(model, target, drafts, ks, bound)
            if best.expected_speedup < PAY_MARGIN:
                probed.calls += 1
                return _chose_plain(plain(target), None, 0.0,
                                    f"no draft can pay, as earlier calls' probes found: "
                                    f"{probed.draft} agreed on {probed.agreed:.3g} of "
                                    f"{probed.tokens:.3g} tokens; at {100 * bound:.0f}% "
                                    f"acceptance and ideal costs the best draft would be "
                                    f"{best.expected_speedup:.2f}x")
    stats, extra = GenerationStats(prompt_tokens=ids.shape[1]), {}
    compiling = compile_stats()
    # running() restores the caller's setting on exit, whatever draft/target switching happened.
    with model.running(target), torch.inference_mode():
        if choose:  # room for timing the longest verify after the prompt (and the plain
            # start), however short the call
            max_len = min(model.config.max_position_embeddings,
                          max(max_len, ids.shape[1] + PROBE_TOKENS * plain_first + max(ks) + 1))
        dec = static_decoder(model, 1, max_len, compile=compile)
        draft_decs = _draft_decoders(drafts, max_len, compile)
        # timed from here, as `generate` times its calls: making the decoders (a process's
        # first: the weights placed on huge pages, 2 s for SmolLM2-135M) is not decoding
        t0 = time.perf_counter()
        state = DraftRound(drafts[0], ks[0], mode, {d.name: 0.0 for d in drafts},
                           plain_ok=auto)
        if seen is not None:
            seen.seed(state)
        head: list[int] = []
        if plain_first:
            # Plain decoding first, as the user would have had it: its steps time plain
            # decoding and its tokens show how often the drafts would agree with it.
            head, rows, steps = _plain_start(model, dec, ids, sampler, eos,
                                             min(PROBE_TOKENS, max_new_tokens), stats, stream, t0)
            cur = torch.tensor([[head[-1]]], device=dec.device)
            going = stats.stop_reason != "eos" and len(head) < max_new_tokens
            costs = _probe_choice(model, dec, ids, head, rows, steps, target, drafts, ks,
                                  sampler, costs, state, extra, key) if going else None
            if costs is None:  # plain decoding to the end, on the same cache
                if not going:
                    extra["choice"] = DraftChoice(
                        None, 0, 0.0, 1.0, 1.0, reason=f"the reply ended within the first "
                                                       f"{PROBE_TOKENS} tokens, decoded plainly")
                model.apply(target)
                head += _plain_steps(dec, cur, sampler, eos, max_new_tokens - len(head), stats,
                                     stream) if going else []
                sync_device(device)
                stats.seconds = time.perf_counter() - t0
                stats.new_tokens = len(head)
                if compile:
                    extra["compile"] = compile_stats().since(compiling)
                return GenerationOutput(tokens=head, prompt=ids[0].tolist(),
                                        widths=list(target.widths), stats=stats, extra=extra,
                                        kv_heads=list(target.kv_heads))
            seen = costs.observed
        else:
            cur = _prefill(dec, draft_decs, ids, stats)  # (1, 1): emitted, not yet in the cache
        if choose and not plain_first:
            costs = _first_choice(model, dec, draft_decs, ids, target, drafts, ks, sampler, state,
                                  costs, extra, key, prune=auto and plain is not None)
            seen = costs.observed if auto else None
            if plain is not None and state.k == 0:  # plain from the start: as generate runs it
                sync_device(device)
                return _chose_plain(plain(target), costs, time.perf_counter() - t0,
                                    extra["choice"].reason, extra["choice"])
        if not plain_first:
            stats.prefill_seconds = time.perf_counter() - t0
        out = head + _rounds(model, dec, draft_decs, cur, state, target, sampler, eos,
                             max_new_tokens - len(head), stats, stream, ks if choose else None,
                             costs, drafts, extra)
        if seen is not None:
            seen.absorb(state)
        if costs is not None and sampler.greedy:
            costs.observed.absorb_acceptance(state)
        sync_device(device)
        stats.seconds = time.perf_counter() - t0
    stats.new_tokens = len(out)
    if compile:
        extra["compile"] = compile_stats().since(compiling)
    if return_cache:
        extra["cache"] = dec.finish()
    return GenerationOutput(tokens=out, prompt=ids[0].tolist(), widths=list(target.widths),
                            stats=stats, draft_widths=list(state.draft.widths), extra=extra,
                            kv_heads=list(target.kv_heads), draft_kv_heads=state.draft.kv_heads)


def _chose_plain(out: GenerationOutput, costs: DecodeCosts | None, choosing: float, reason: str,
                 choice: DraftChoice | None = None) -> GenerationOutput:
    """Plain decoding's output as `auto`'s: the choice and costs (when any were measured) in
    `extra`, the `choosing` seconds spent before it (prompt agreement, timing) added to its
    time."""
    out.stats.seconds += choosing
    out.stats.prefill_seconds += choosing
    out.extra["choice"] = replace(choice, reason=reason) if choice is not None else DraftChoice(
        None, 0, 0.0, 1.0, 1.0, reason=reason)
    if costs is not None:
        out.extra["costs"] = costs
    out.extra["choosing_seconds"] = choosing
    return out


def _first_choice(model: MatFormerLM, dec: StaticDecoder, draft_decs: dict[str, StaticDecoder],
                  ids: torch.Tensor, target: Setting, drafts: list[Draft],
                  ks: Sequence[int], sampler: Sampler, state: DraftRound, costs: DecodeCosts | None,
                  extra: dict[str, Any], key: tuple, *, prune: bool = False) -> DecodeCosts:
    """The first (draft, k) choice, from the prompt's agreement and the costs (measured now,
    and kept for later calls, unless `costs` cover every draft and k); returns the costs (also
    in `extra["costs"]`). `prune` (plain decoding may be chosen): when no draft could pay even
    fully accepted, neither the agreement nor the other verifies are measured."""
    if not _covers(costs, drafts, ks):
        costs = measure_costs(model, dec, target, drafts, draft_decs, ks, prune=prune)
        _keep_costs(model, key, costs, drafts)
    extra["costs"] = costs
    if prune and not can_pay(costs, [d.name for d in drafts], ks):
        extra["choice"] = DraftChoice(None, 0, 0.0, 1.0, 1.0,
                                      reason="no draft pays even if every draft is accepted")
        state.k = 0
        return costs
    # A named draft (plain decoding not an option): what earlier calls' rounds accepted, no
    # forward to measure it. Not where plain decoding may be chosen (`draft_tier="auto"`): a
    # few fully accepted rounds there made a draft look certain and lose to plain decoding
    # (the demo's eval table: 0.91x against 0.98-1.15x with the tail's agreement).
    earlier = (costs.observed.prior(drafts) if sampler.greedy and not state.plain_ok
               else None)
    if earlier is not None:
        state.prior = earlier
    elif dec.pos and all(d.model is None for d in drafts):
        n = min(PROBE_TOKENS, dec.pos)
        state.prior = {name: succession(a, n) for name, a in
                       tail_agreement(model, dec, ids, target, drafts, sampler, n).items()}
    else:
        state.prior = {name: succession(a, ids.shape[1] - 1) for name, a in
                       prompt_agreement(model, ids, target, drafts, sampler).items()}
    rechoose_draft(state, drafts, costs, ks, extra)
    extra["first_choice"] = extra["choice"]  # from the costs alone, before any round
    return costs


def _probe_choice(model: MatFormerLM, dec: StaticDecoder, ids: torch.Tensor, head: list[int],
                  rows: list[torch.Tensor], steps: list[float], target: Setting,
                  drafts: list[Draft], ks: Sequence[int], sampler: Sampler,
                  costs: DecodeCosts | None, state: DraftRound, extra: dict[str, Any],
                  key: tuple) -> DecodeCosts | None:
    """After the plain start (`head`, picked from `rows`, its steps taking `steps` seconds):
    whether drafting is worth a look. The widest draft's agreement with `head` (one forward)
    bounds every draft's acceptance from above (a narrower width of the same model agrees no
    more, as a rule); at that bound and at costs no real decoding beats (`ideal_costs`, scaled
    by the plain steps just timed; or the costs measured earlier), if no draft promises
    PAY_MARGIN over plain decoding, None: decode plainly to the end,
    the only extra work that one forward. Else every draft's agreement is its prior, the costs
    are measured (unless `costs` cover every draft and k; kept for later calls) and the first
    (draft, k) is chosen; returns the costs."""
    t0 = time.perf_counter()
    n = len(head)
    inputs = torch.tensor([[int(ids[0, -1]), *head[:-1]]], device=dec.device)
    plain_step = sorted(steps)[len(steps) // 2]
    widest = max(drafts, key=lambda d: (step_work(model, d.setting), d.name))
    agreed = {widest.name: probe_agreement(model, dec, target, widest, inputs, rows, sampler)}
    bound = acceptance_bound(agreed[widest.name], n)
    _probed(model, key, sampler).add(widest.name, agreed[widest.name], n)
    measured = _covers(costs, drafts, ks)
    names = [d.name for d in drafts]
    if measured:
        assert costs is not None
        best = choose_draft(costs, dict.fromkeys(names, bound), ks, allow_plain=False,
                            slowdown=state.slowdown(), plain=state.plain_step())
    else:
        best = ideal_best(model, target, drafts, ks, bound, plain_step)
    extra["probe"] = {"tokens": n, "draft": widest.name, "agreed": agreed[widest.name],
                      "acceptance_bound": bound, "best_speedup": best.expected_speedup,
                      "ideal_costs": not measured, "plain_step": plain_step}
    if best.expected_speedup < PAY_MARGIN:
        extra["choice"] = DraftChoice(
            None, 0, 0.0, 1.0, 1.0,
            reason=f"no draft can pay: {widest.name} agreed on {agreed[widest.name]:.3g} of the "
                   f"first {n} tokens; at {100 * bound:.0f}% acceptance "
                   + ("and the costs measured before" if measured else "and ideal costs")
                   + f" the best draft would be {best.expected_speedup:.2f}x")
        extra["choosing_seconds"] = time.perf_counter() - t0
        if costs is not None:
            extra["costs"] = costs
        state.k = 0
        return None
    for d in drafts:
        if d.name not in agreed:
            agreed[d.name] = probe_agreement(model, dec, target, d, inputs, rows, sampler)
    state.prior = {name: succession(a / n, n) for name, a in agreed.items()}
    if not measured:
        costs = measure_costs(model, dec, target, drafts, {}, ks, prune=True)
        _keep_costs(model, key, costs, drafts)
    assert costs is not None
    extra["costs"] = costs
    rechoose_draft(state, drafts, costs, ks, extra)
    extra["first_choice"] = extra["choice"]
    extra["choosing_seconds"] = time.perf_counter() - t0
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


def rechoose_draft(state: DraftRound, drafts: Sequence[Draft], costs: DecodeCosts,
                   ks: Sequence[int], extra: dict[str, Any]) -> None:
    """Pick (draft, k) from the costs, scaled by the rounds' observed slowdown, at the
    acceptance seen so far. With k and the draft chosen (`draft_tier="auto"`) and no pair
    expected to beat plain decoding, k = 0: plain decoding; a named draft drafts at its best k
    even then."""
    auto = state.mode == "auto"
    slow = state.slowdown()
    plain = state.plain_step()
    choice = choose_draft(costs, state.acceptance(), ks if auto else [state.k],
                          allow_plain=auto and state.plain_ok, slowdown=slow, plain=plain)
    if auto:  # explore: a little-observed draft whose optimistic acceptance would beat the choice
        upper = state.upper()
        others = [choose_draft(costs, {n: upper[n]}, ks, allow_plain=False, slowdown=slow,
                               plain=plain)
                  for n in upper if n != choice.draft
                  and state.seen.get(n, [0, 0])[1] < PRIOR_WEIGHT]
        best = max(others, key=lambda c: c.expected_speedup, default=None)
        floor = PAY_MARGIN if choice.draft is None else choice.expected_speedup
        if best is not None and best.expected_speedup > floor:
            choice = replace(best, explore=True, reason=best.reason + " (optimistic: exploring)")
    if choice.draft is None and state.timed:
        choice = replace(choice, reason="the rounds ran slower than plain decoding would")
    extra["choice"] = choice
    if choice.draft is None:
        state.k = 0
        return
    state.draft = next(d for d in drafts if d.name == choice.draft)
    state.k = choice.k


def _compile_marker() -> tuple[int, int, int, float]:
    """What this process has compiled or loaded so far: a round during which it changed timed
    the compiler (a first verify of some k), not the round, and is not an observation."""
    c = compile_stats()
    return c.graphs, c.precompiled, c.saved, precompile_seconds()


def _rounds(model: MatFormerLM, dec: StaticDecoder, draft_decs: dict[str, StaticDecoder],
            cur: torch.Tensor, state: DraftRound, target: Setting, sampler: Sampler,
            eos: set[int],
            max_new_tokens: int, stats: GenerationStats, stream: StreamCallback | None,
            ks: Sequence[int] | None, costs: DecodeCosts | None, drafts: Sequence[Draft],
            extra: dict[str, Any]) -> list[int]:
    """Draft-verify rounds until EOS or `max_new_tokens`; `ks`: re-choose after each round,
    from the costs and each round's wall time; once plain decoding is chosen (k = 0 with the
    draft chosen too), plain steps to the end."""
    out: list[int] = []
    while stats.stop_reason != "eos" and len(out) < max_new_tokens:
        if state.k == 0 and state.plain_ok and ks is not None:
            model.apply(target)
            out += _plain_steps(dec, cur, sampler, eos, max_new_tokens - len(out), stats, stream)
            break
        t0, compiling = time.perf_counter(), _compile_marker()
        state.rounds += 1
        if ks is not None and state.probe_plain():  # one plain step, timed
            model.apply(target)
            new = _plain_steps(dec, cur, sampler, eos, 1, stats, stream)
            if _compile_marker() == compiling:  # a step that compiled timed the compiler
                state.plain_timed[0] += time.perf_counter() - t0
                state.plain_timed[1] += 1
            out += new
            cur = torch.tensor([[new[-1]]], device=dec.device)
            if costs is not None and state.mode == "auto":
                rechoose_draft(state, drafts, costs, ks, extra)
            continue
        start = dec.pos
        # One token always comes from the verifier, so at most remaining-1 drafts count.
        kk = min(state.k, max_new_tokens - len(out) - 1)
        ddec = draft_decs.get(state.draft.name)
        # greedy at a width of this model: the whole round as one C++ call where it runs
        native = (dec.greedy_round(state.draft.setting, target, int(cur), kk)
                  if sampler.greedy and ddec is None and kk > 0 else None)
        if native is not None:
            stats.draft_forwards += kk
            n, new = greedy_accept(*native)
        else:
            drafts_, q_rows = _draft(model, dec, ddec, cur, kk, state.draft, sampler, stats)
            model.apply(target)
            block = torch.cat([cur, *drafts_], dim=1)  # (1, kk+1): cur, d1..dk
            p_logits = dec.forward(block)[0]  # (kk+1, V)
            n, new = verify_drafts(sampler, p_logits, block[0, 1:], q_rows)
        stats.target_forwards += 1
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
        seen[1] += kk if state.plain_ok else n + (n < kk)
        timed = [0.0, 0.0]
        if costs is not None and kk > 0 and kk in costs.verify \
                and state.draft.name in costs.draft_steps and _compile_marker() == compiling:
            # the whole round against what the costs predicted for it (its choosing is added
            # after it, for the next choice)
            timed = state.timed.setdefault(state.draft.name, [0.0, 0.0])
            timed[0] += time.perf_counter() - t0
            timed[1] += round_seconds(costs, state.draft.name, kk)
        t1 = time.perf_counter()
        if state.mode == "adaptive":
            state.k = (min(state.k + 2, 16) if n == kk and kk > 0 else max(1, state.k - 1))
        elif ks is not None and costs is not None:
            rechoose_draft(state, drafts, costs, ks, extra)
        timed[0] += time.perf_counter() - t1
    return out


def _plain_steps(dec: StaticDecoder, cur: torch.Tensor, sampler: Sampler, eos: set[int],
                 room: int, stats: GenerationStats, stream: StreamCallback | None) -> list[int]:
    """Plain decoding on the decoder from `cur` (emitted, not yet in the cache): up to `room`
    tokens, one step each, until EOS. Eagerly each step is `generate`'s (the model's forward
    over the cache's filled columns, cheaper eagerly than the static step over all of them)."""
    out: list[int] = []
    eager = not dec.compiled and int(dec.pad.max()) == 0
    while len(out) < room:
        logits = _plain_logits(dec, cur, eager)
        tok = int(sampler.pick(logits))
        stats.target_forwards += 1
        if emit_token(tok, out, stream, eos, stats):
            break
        cur = torch.tensor([[tok]], device=dec.device)
    return out


def _plain_logits(dec: StaticDecoder, cur: torch.Tensor, eager: bool) -> torch.Tensor:
    """The next logits (V,) after the token `cur` (1, 1): `generate`'s own eager step (the
    model's forward over the cache's filled columns, not all of them) or the decoder's step."""
    if not eager:
        return dec.step(cur)[0]
    dec.cache.length = dec.pos
    logits = dec.model(cur, cache=dec.cache)[0, -1]
    dec.pos += 1
    return logits


def _plain_start(model: MatFormerLM, dec: StaticDecoder, ids: torch.Tensor, sampler: Sampler,
                 eos: set[int], room: int, stats: GenerationStats,
                 stream: StreamCallback | None, t0: float) -> tuple[list[int],
                                                                    list[torch.Tensor],
                                                                    list[float]]:
    """Plain decoding from the prompt, as `generate` runs it (eagerly: the prompt's forward,
    then one step a token over the cache's filled columns; compiled: the static prefill and
    step): up to `room` tokens, until EOS. Returns the tokens, the logits each was picked from
    and the seconds of each step after the prompt's (what plain decoding costs here, now).
    The last token is emitted but not yet in the cache (`dec.pos` is its column); `t0`: when
    the call started (for `stats.prefill_seconds`)."""
    if dec.compiled or int(dec.pad.max()) != 0:
        logits = dec.prefill([ids[0]])[0]
    else:
        dec.cache.length = 0
        with half_on_cpu(dec.model):  # as generate reads a prompt
            logits = dec.model(ids, cache=dec.cache)[0, -1]
        dec.pos = ids.shape[1]
    stats.target_forwards += 1
    out: list[int] = []
    rows: list[torch.Tensor] = []
    steps: list[float] = []
    while True:
        tok = int(sampler.pick(logits))
        if not out:
            stats.prefill_seconds = time.perf_counter() - t0  # time to the first token
        rows.append(logits)
        if emit_token(tok, out, stream, eos, stats) or len(out) >= room:
            break
        began = time.perf_counter()
        cur = torch.tensor([[tok]], device=dec.device)
        logits = _plain_logits(dec, cur, not dec.compiled)
        steps.append(time.perf_counter() - began)
        stats.target_forwards += 1
    return out, rows, steps


def probe_agreement(model: MatFormerLM, dec: StaticDecoder, target: Setting, draft: Draft,
                    inputs: torch.Tensor, rows: Sequence[torch.Tensor],
                    sampler: Sampler) -> float:
    """How many of the tokens plain decoding just picked a width `draft` of the target would
    have proposed, teacher-forced: one forward at the draft's width over `inputs` (1, n) (the
    tokens that were fed to pick them, in the columns that end at `dec.pos`), attending to the
    target's cache before them, against the target's logits `rows` (n of (V,)). Greedy: the
    count of equal argmaxes; sampling: the sum over positions of sum_v min(p, q) (the
    probability the rule accepts a draft token). The target's entries in those columns are
    put back, so decoding goes on as if nothing ran."""
    start = dec.pos - inputs.shape[1]
    with _columns_put_back(model, dec, target, start):
        model.apply(draft.setting)
        q_logits = model(inputs, cache=dec.cache, start=start)[0]  # (n, V)
    p_logits = torch.stack(list(rows))
    if sampler.greedy:
        return float((q_logits.argmax(-1) == p_logits.argmax(-1)).sum())
    return float(torch.minimum(sampler.probs(p_logits), sampler.probs(q_logits)).sum())


@contextlib.contextmanager
def _columns_put_back(model: MatFormerLM, dec: StaticDecoder, target: Setting,
                      start: int) -> Iterator[None]:
    """Forwards over `dec`'s columns start..dec.pos inside it leave no trace: the cache's
    entries there, the decoder's column and the model's setting (`target`) are as they were."""
    end, cache = dec.pos, dec.cache
    saved = [(k[:, :, start:end].clone(), v[:, :, start:end].clone())
             for k, v in zip(cache.k, cache.v, strict=True)]
    try:
        yield
    finally:
        model.apply(target)
        for (k, v), (k0, v0) in zip(zip(cache.k, cache.v, strict=True), saved, strict=True):
            k[:, :, start:end].copy_(k0)
            v[:, :, start:end].copy_(v0)
        cache.length = dec.pos = end


def tail_agreement(model: MatFormerLM, dec: StaticDecoder, ids: torch.Tensor, target: Setting,
                   drafts: Sequence[Draft], sampler: Sampler,
                   n: int = PROBE_TOKENS) -> dict[str, float]:
    """`prompt_agreement` of widths of the target on the last `n` prompt tokens in `dec`'s cache
    (`ids` (1, P) is the prompt, its first `dec.pos` tokens prefilled), teacher-forced: one
    forward of n tokens at the target's width and one at each draft's (as `probe_agreement`),
    the cache's entries put back, instead of two forwards of the whole prompt. Those were 0.1-0.35 s
    of a 64-token call on the 41.7M benchmark model after a 64-token prompt, as much as the
    rounds gained; the rounds' own acceptance corrects a prior from fewer positions."""
    n = min(n, dec.pos)
    start = dec.pos - n
    inputs = ids[:, start:dec.pos]

    def logits(setting: Setting) -> torch.Tensor:  # (n, V) at `setting`, teacher-forced
        model.apply(setting)
        if dec.native:  # the C++ step's verify: a few steps' time, where eager takes 2-3x that
            dec.crop(start)
            return dec.forward(inputs)[0]
        return model(inputs, cache=dec.cache, start=start)[0]

    with _columns_put_back(model, dec, target, start):
        p = logits(target)
        qs = {d.name: logits(d.setting) for d in drafts}
    if sampler.greedy:
        return {name: float((q.argmax(-1) == p.argmax(-1)).float().mean()) for name, q in qs.items()}
    pp = sampler.probs(p)
    return {name: float(torch.minimum(pp, sampler.probs(q)).sum(-1).mean())
            for name, q in qs.items()}


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


def greedy_accept(drafts: list[int], best: list[int]) -> tuple[int, list[int]]:
    """Greedy verification: (n, the tokens to emit) for `drafts` (k) against the target's argmax
    `best` after each of the k + 1 tokens: the longest prefix of drafts equal to the target's
    choices, then the target's own next token."""
    n = next((i for i, (d, b) in enumerate(zip(drafts, best[:-1], strict=True)) if d != b),
             len(drafts))
    return n, drafts[:n] + [best[n]]


def verify_drafts(sampler: Sampler, p_logits: torch.Tensor, d: torch.Tensor,
                  q_rows: Sequence[torch.Tensor] = ()) -> tuple[int, list[int]]:
    """The verifier's decision on drafts `d` (kk,) from its logits (kk+1, V): (accepted count
    n, the tokens to emit: d[:n] and one token of the verifier's own). Greedy: the longest
    prefix equal to the target's argmax; sampling (`q_rows`, the processed draft
    distributions): the standard acceptance rule. Also the server's rule (`matformer serve`)."""
    kk = d.shape[0]
    if sampler.greedy:
        return greedy_accept(d.tolist(), p_logits.argmax(-1).tolist())
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

