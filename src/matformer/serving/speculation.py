"""When the server decodes a request speculatively, with which nested draft, and how many tokens.

Speculation pays when a step is latency-bound: one row alone, its step paying for weights read
once per token. With several rows the batch already shares those reads, and a round that drafts
for one row would stall the others; so the engine asks `Speculator.plan` only when its running
batch is one greedy decoding job (`engine.Engine.step`), and runs plain batched steps otherwise.

The drafts of a target width are the catalog's uniform tiers narrower than it, at the target's
KV heads: they read and write the job's own KV slot (the draft's entries are cropped away, and
the verify forward writes the target's over them), as `inference.speculative` does with its
shared cache. The choice is that module's, on the server's own operations:

- `DecodeCosts`: measured once per target width -- the full width's when the server starts
  (`prepare`), any other's the first time a lone job runs at it -- on a scratch slot: a plain step (the engine's batched step of one row with its
  argmax), each draft's step, and the verify forward of k+1 tokens (timed at k = 1, 2, 4, 8,
  interpolated between);
- `DraftRound`: the acceptance (the prompt's teacher-forced agreement as the prior, then the
  accepted/drafted counts of real rounds), each draft's rounds' wall time against what the costs
  predicted (the slowdown), and plain steps' own wall time per token, observed while serving;
  each draft's round ages that draft's older observations, each plain token the older plain
  ones (`DECAY`), so the choice follows the machine's load and the text being generated (while
  plain steps win, their times are folded in RECHOOSE_EVERY at a time: choosing costs ~0.1 ms,
  a few percent of a small model's step);
- `rechoose_draft` after every observation: the (draft, k) of the highest expected tokens/s, or
  plain steps when no pair is expected to beat them; a draft little observed is tried while its
  optimistic acceptance would win, until it has drafted `PRIOR_WEIGHT` tokens (a draft's counts
  age only with its own rounds, so this bound holds).

Both sides keep being measured while the other runs, at a bounded cost: while drafting, one
round in PLAIN_PROBE_EVERY is a plain step (`DraftRound.probe_plain`); while plain steps win,
one round of the best draft every REPROBE_EVERY plain tokens, and only while fully accepted
drafts could still pay. So a draft that does not pay costs at most that one round in
REPROBE_EVERY tokens, and `--speculative off` costs nothing.

Only greedy requests are speculated: their output is the target's greedy output whatever is
drafted (tested against `matformer generate`). A sampled request would keep its distribution
under the acceptance rule (`verify_drafts` implements it), but whether a round drafts depends on
timing, and so would the random stream: a seeded request would no longer repeat itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from matformer.inference.sampling import Sampler
from matformer.inference.speculative import (
    DecodeCosts,
    Draft,
    DraftRound,
    can_pay,
    choose_draft,
    interpolate_verify,
    prompt_agreement,
    rechoose_draft,
    round_seconds,
    timed_together,
    verify_points,
)
from matformer.serving.catalog import Catalog, setting_key
from matformer.serving.rows import RowStepper
from matformer.tiers import Setting

MODES = ("auto", "off", "always")
"""`--speculative`: auto (draft when it pays, measured), off, always (draft every round with the
narrowest draft and ALWAYS_K tokens: for tests and for measuring what forcing costs)."""

KS = tuple(range(1, 9))
"""Draft lengths `auto` chooses among."""

ALWAYS_K = 4

DECAY = 0.98
"""Weight left to what was observed before, after each round or plain token (about the last
50 observations count)."""

RECHOOSE_EVERY = 16
"""Plain tokens folded into the choice at once while plain steps win."""

REPROBE_EVERY = 64
"""Plain tokens of lone jobs between two rounds of the best draft, while plain steps win."""

AGREEMENT_TOKENS = 32
"""Prompt tokens (the last ones) the first acceptance estimate is computed on (one forward of
them at the target and at each draft, once per width: ~1 s at 135M on a busy CPU core)."""

REPS = 3
"""Timed runs of each operation (the least counts: load only ever adds time)."""

@dataclass
class Plan:
    """What the next round of a lone job runs: `draft` and `k` tokens."""

    draft: Draft
    k: int
    probe: bool = False
    """A round taken to keep the draft measured while plain steps win."""


@dataclass
class TargetState:
    """What `auto` knows about speculating at one target width."""

    drafts: list[Draft]
    costs: DecodeCosts
    round: DraftRound
    extra: dict[str, Any] = field(default_factory=dict)
    """`rechoose_draft`'s output: extra["choice"], the last choice and why."""
    plain_since: int = 0
    """Plain tokens of lone jobs since the draft was last tried."""
    pending: list = field(default_factory=lambda: [0.0, 0])
    """[seconds, tokens] of plain steps not yet folded into `round`."""


class Speculator:
    """The engine's speculative-decoding choices, per target width (engine thread only)."""

    def __init__(self, stepper: RowStepper, catalog: Catalog, mode: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"speculative mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.stepper = stepper
        self.catalog = catalog
        self.mode = mode
        self.states: dict[Hashable, TargetState] = {}
        self.costs: dict[Hashable, DecodeCosts] = {}
        """Costs timed ahead of a first lone job (`prepare`), by target width."""
        self.disabled: set[Hashable] = set()
        """Target widths at which measuring or a round failed: plain steps only."""
        self._drafts: dict[Hashable, list[Draft]] = {}

    def prepare(self, target: Setting, length: int = 32) -> DecodeCosts | None:
        """Time the costs at `target` now (the server's start, for its full width), so the first
        request decoding alone there does not wait for them; None: nothing to draft with."""
        drafts = self.drafts(target)
        if self.mode != "auto" or not drafts:
            return None
        costs = self.costs[setting_key(target)] = self.measure(target, drafts, length)
        return costs

    def disable(self, target: Setting) -> None:
        """No more speculation at `target` (a draft or verify forward failed there)."""
        self.disabled.add(setting_key(target))

    def drafts(self, target: Setting) -> list[Draft]:
        """The uniform tiers narrower than `target` (at most 3, widest first), at its heads."""
        key = setting_key(target)
        if key not in self._drafts:
            found = []
            for tier in self.catalog.tier_widths():
                assert tier.setting is not None
                if sum(tier.setting.widths) >= sum(target.widths):
                    continue
                setting = Setting(list(tier.setting.widths), list(target.kv_heads))
                found.append(Draft(self.catalog.named(setting).name, setting.widths,
                                   kv_heads=setting.kv_heads))
            self._drafts[key] = found[:3]
        return self._drafts[key]

    def plan(self, target: Setting, prompt: Sequence[int], length: int) -> Plan | None:
        """The next round of the lone greedy job at `target` whose cache holds `length`
        positions (`prompt`: its prompt, for a first acceptance estimate): a `Plan`, or None
        for a plain step."""
        if self.mode == "off":
            return None
        drafts = self.drafts(target)
        if not drafts or setting_key(target) in self.disabled:
            return None
        if self.mode == "always":
            return Plan(drafts[-1], ALWAYS_K)
        key = setting_key(target)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = self._first(target, drafts, prompt, length)
        r = state.round
        if r.k > 0:
            r.rounds += 1
            return None if r.probe_plain() else Plan(r.draft, r.k)
        state.plain_since += 1
        if state.plain_since < REPROBE_EVERY:
            return None
        state.plain_since = 0
        if not can_pay(state.costs, [d.name for d in drafts], KS):
            return None  # even fully accepted drafts would not beat a plain step
        best = choose_draft(state.costs, r.acceptance(), KS, allow_plain=False,
                            slowdown=r.slowdown(), plain=r.plain_step())
        assert best.draft is not None
        return Plan(next(d for d in drafts if d.name == best.draft), best.k, probe=True)

    def observe_round(self, target: Setting, plan: Plan, drafted: int, accepted: int,
                      seconds: float) -> None:
        """Fold one round (its wall time, `accepted` of `drafted`) into the choice."""
        state = self.states.get(setting_key(target))
        if state is None or drafted == 0:
            return
        r = state.round
        name = plan.draft.name
        seen = r.seen.setdefault(name, [0, 0])
        _age(seen)
        seen[0] += accepted
        seen[1] += drafted
        if drafted in state.costs.verify:
            timed = r.timed.setdefault(name, [0.0, 0.0])
            _age(timed)
            timed[0] += seconds
            timed[1] += round_seconds(state.costs, name, drafted)
        rechoose_draft(r, state.drafts, state.costs, KS, state.extra)

    def observe_plain(self, target: Setting, seconds: float) -> None:
        """Fold one plain step of a lone job (its wall time, one token) into the choice. While
        plain steps win they are folded in RECHOOSE_EVERY at a time (choosing again costs
        ~0.1 ms, a few percent of a small model's step)."""
        state = self.states.get(setting_key(target))
        if state is None:
            return
        state.pending[0] += seconds
        state.pending[1] += 1
        r = state.round
        if r.k == 0 and state.pending[1] < RECHOOSE_EVERY:
            return
        took, n = state.pending
        state.pending = [0.0, 0]
        _age(r.plain_timed, DECAY ** n)
        r.plain_timed[0] += took
        r.plain_timed[1] += n
        rechoose_draft(r, state.drafts, state.costs, KS, state.extra)

    def describe(self, target: Setting) -> str:
        """The last choice at `target` and why (for logs and tests)."""
        state = self.states.get(setting_key(target))
        if state is None or "choice" not in state.extra:
            return "not measured"
        c = state.extra["choice"]
        return f"{c.draft or 'plain'} k={c.k}: {c.reason}"

    # ---- measuring -----------------------------------------------------------------------

    def _first(self, target: Setting, drafts: list[Draft], prompt: Sequence[int],
               length: int) -> TargetState:
        costs = self.costs.pop(setting_key(target), None) or self.measure(target, drafts, length)
        if can_pay(costs, [d.name for d in drafts], KS):
            ids = torch.tensor([list(prompt)[-AGREEMENT_TOKENS:]], dtype=torch.long,
                               device=self.stepper.device)
            with torch.inference_mode():
                prior = prompt_agreement(self.stepper.model, ids, target, drafts, Sampler())
        else:  # no draft pays even fully accepted: no forward spent on estimating acceptance
            prior = dict.fromkeys([d.name for d in drafts], 0.0)
        r = DraftRound(drafts[0], 0, "auto", prior, plain_ok=True)
        state = TargetState(drafts, costs, r)
        rechoose_draft(r, drafts, costs, KS, state.extra)
        return state

    def measure(self, target: Setting, drafts: Sequence[Draft], length: int) -> DecodeCosts:
        """Time what a round and a plain step run, on a scratch slot at position `length`
        (capped so the longest verify fits the context): the least of REPS interleaved runs
        of each, after one warm-up run."""
        t0 = time.perf_counter()
        stepper = self.stepper
        room = max(KS) + 1
        pos = max(0, min(length, stepper.pool.context - room))
        cache = stepper.new_cache(target, pos + room)
        try:
            def step(setting: Setting) -> Callable[[], None]:
                def run() -> None:
                    cache.length = pos
                    stepper.step(setting, [cache], [0]).argmax(-1).tolist()
                return run

            def verify(k: int) -> Callable[[], None]:
                def run() -> None:
                    cache.length = pos
                    stepper.forward_all(target, cache, [0] * (k + 1)).argmax(-1).tolist()
                return run

            points = verify_points(KS)
            runs: dict[Any, Callable[[], None]] = {"plain": step(target)}
            runs.update({d.name: step(d.setting) for d in drafts})
            runs.update({("verify", k): verify(k) for k in points})
            best = timed_together({key: (_nothing, run) for key, run in runs.items()},
                                  stepper.device, REPS, warm=True)
        finally:
            stepper.release(cache)
        return DecodeCosts(best["plain"], {d.name: best[d.name] for d in drafts},
                           interpolate_verify({k: best[("verify", k)] for k in points}, KS),
                           position=pos, seconds=time.perf_counter() - t0,
                           plain_step=best["plain"], measured_ks=points)


def _nothing() -> None:
    """No set-up before a timed run (the runs set their cache's length themselves)."""


def _age(pair: list, factor: float = DECAY) -> None:
    """An observation sum ([numerator, denominator]) with its past weighing `factor` less: the
    choice follows the machine and the text."""
    pair[0] *= factor
    pair[1] *= factor
