"""`draft_tier="auto"` is never slower than plain decoding (issue 28).

The decisions are checked deterministically, with given costs, by counting the forwards each
call runs (no timing assertion: the CI machine is shared); the tokens/s comparison on a real
measurement is the slow test at the end and `benchmarks/speed/decode.py`."""

from __future__ import annotations

import statistics

import pytest
import torch

from matformer.inference.decode import generate
from matformer.inference.sampling import GenerationStats, Sampler
from matformer.inference.speculative import (
    PAY_MARGIN,
    PRIOR_WEIGHT,
    PROBE_TOKENS,
    REPROBE_EVERY,
    DecodeCosts,
    Draft,
    _plain_start,
    acceptance_bound,
    cached_costs,
    choose_draft,
    ideal_costs,
    probe_agreement,
    speculative_generate,
    step_work,
    tail_agreement,
)
from matformer.inference.static_cache import StaticDecoder
from matformer.tiers import Setting, WidthRequest
from tests.conftest import tiny_lm

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 31, 64]
NAMES = ["tier 1 (width 128)", "tier 2 (width 64)", "tier 3 (width 32)"]


@pytest.fixture(scope="module")
def model():
    return tiny_lm(8)


def _counted(model, fn):
    """(fn's output, how many forwards of the model it ran (its embedding calls))."""
    calls = [0]
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        return fn(), calls[0]
    finally:
        hook.remove()


def test_auto_that_cannot_pay_is_plain_decoding_itself(model, one_thread) -> None:
    """Costs where even fully accepted drafts lose (a draft step as dear as a plain step):
    auto runs `generate` itself, no prompt-agreement forward, no draft forward, no timing,
    the same forwards and tokens as plain decoding, greedy and sampled; and says why."""
    costs = DecodeCosts(1.0, dict.fromkeys(NAMES, 1.0), {k: 1.0 + 0.1 * k for k in range(1, 9)},
                        plain_step=1.0)
    for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 3}):
        plain, n_plain = _counted(model, lambda kw=kw: generate(model, PROMPT, 24,
                                                                ignore_eos=True, **kw))
        auto, n_auto = _counted(model, lambda kw=kw: speculative_generate(
            model, PROMPT, 24, draft_tier="auto", costs=costs, ignore_eos=True, **kw))
        assert auto.tokens == plain.tokens and n_auto == n_plain == 24
        assert auto.stats.drafted == auto.stats.draft_forwards == 0
        assert auto.extra["choice"].draft is None
        assert "every draft is accepted" in auto.extra["choice"].reason
        assert auto.extra["costs"] is costs and auto.extra["choosing_seconds"] == 0.0


def test_auto_drafts_only_for_a_gain_beyond_the_margin(model, one_thread) -> None:
    """Drafts that would pay a little even fully accepted (1.10x at best here: a draft step at
    0.85 of a plain step) are not worth `auto`'s noisy estimates: it is `generate` itself; a
    draft at 0.5 of a step (1.7x fully accepted) is used."""
    verify = {k: 1.0 + 0.05 * k for k in range(1, 9)}
    costs = DecodeCosts(1.0, dict.fromkeys(NAMES, 0.85), verify, plain_step=1.0)
    best = choose_draft(costs, dict.fromkeys(NAMES, 1.0), allow_plain=False)
    assert 1.0 < best.expected_speedup < PAY_MARGIN
    plain, n_plain = _counted(model, lambda: generate(model, PROMPT, 24, ignore_eos=True))
    auto, n_auto = _counted(model, lambda: speculative_generate(
        model, PROMPT, 24, draft_tier="auto", costs=costs, ignore_eos=True))
    assert auto.tokens == plain.tokens and n_auto == n_plain and auto.stats.drafted == 0
    assert auto.extra["choice"].draft is None
    costs = DecodeCosts(1.0, dict.fromkeys(NAMES, 0.5), verify, plain_step=1.0)
    assert choose_draft(costs, dict.fromkeys(NAMES, 1.0)).expected_speedup > PAY_MARGIN
    auto = speculative_generate(model, PROMPT, 24, draft_tier="auto", costs=costs,
                                ignore_eos=True)
    assert auto.tokens == plain.tokens and auto.stats.drafted > 0


def _auto_on_promising_costs(model):
    """(costs, plain output, auto's output) for 40 greedy tokens with costs that promise a
    large gain (microsecond steps; a real round takes far longer); the outputs' tokens equal."""
    costs = DecodeCosts(1e-6, dict.fromkeys(NAMES, 1e-9), dict.fromkeys(range(1, 9), 1e-7),
                        plain_step=1e-6)
    plain = generate(model, PROMPT, 40, ignore_eos=True)
    out = speculative_generate(model, PROMPT, 40, draft_tier="auto", costs=costs,
                               ignore_eos=True)
    assert out.tokens == plain.tokens
    return costs, plain, out


def test_auto_drops_a_draft_whose_rounds_cost_more_than_predicted(model, one_thread) -> None:
    """Costs that promise a large gain (microsecond steps) while a real round takes far longer
    than predicted: after the first round the observed slow-down makes every draft lose to
    plain decoding's step, and auto decodes plainly to the end, with the target's tokens; a
    later call with the same costs remembers it."""
    costs, plain, out = _auto_on_promising_costs(model)
    assert 0 < out.stats.drafted <= 8  # one round, then plain steps
    assert out.extra["choice"].draft is None
    assert "slower than plain" in out.extra["choice"].reason
    # The next call with these costs starts from what the rounds showed: no draft could pay,
    # so it is plain decoding itself from the start, with no draft forward and no choosing.
    again, n_again = _counted(model, lambda: speculative_generate(
        model, PROMPT, 40, draft_tier="auto", costs=costs, ignore_eos=True))
    assert again.tokens == plain.tokens and n_again == 40 and again.stats.drafted == 0
    assert "earlier calls" in again.extra["choice"].reason


def test_a_round_that_compiled_is_not_an_observation(model, one_thread, monkeypatch) -> None:
    """The same promising costs, but every round compiled something (a first verify of its
    k): its wall time is the compiler's, so it neither drops the draft nor is kept."""
    import matformer.inference.speculative as spec

    ticks = iter(range(10**6))
    monkeypatch.setattr(spec, "_compile_marker", lambda: (next(ticks), 0, 0, 0.0))
    costs, _, out = _auto_on_promising_costs(model)
    assert out.stats.drafted > 8 and out.extra["choice"].draft is not None  # still drafting
    assert not costs.observed.timed  # nothing kept from rounds that compiled


def test_auto_measures_costs_once_per_process(one_thread) -> None:
    """The costs are timed by the first call (what a round runs, plain decoding's own step
    too) and reused by later calls at the same target and drafts; the output stays the
    target's greedy output either way."""
    model = tiny_lm(9)
    plain = generate(model, PROMPT, 12, ignore_eos=True)
    first = speculative_generate(model, PROMPT, 12, draft_tier="auto", ignore_eos=True)
    c = first.extra["costs"]
    assert c.plain_step > 0 and c.target_step > 0 and set(c.draft_steps) == set(NAMES)
    assert sorted(c.verify) == list(range(1, 9)) and c.measured_ks[0] == 1
    second = speculative_generate(model, PROMPT, 12, draft_tier="auto", ignore_eos=True)
    assert second.extra["costs"] is c
    assert first.tokens == second.tokens == plain.tokens
    # The costs are timed after the plain start (its probe found that drafts might pay): the
    # longest verify still has room there, however short the call.
    assert first.extra["probe"]["best_speedup"] >= PAY_MARGIN
    fixed = speculative_generate(model, PROMPT, 12, draft_tier="auto", draft_tokens=8,
                                 ignore_eos=True)
    assert fixed.extra["costs"].measured_ks == [8] and fixed.tokens == plain.tokens


def test_verifies_timed_apart_are_taken_at_the_first_batchs_scale(monkeypatch) -> None:
    """measure_costs times the larger verifies in a second batch; a burst of load over that
    batch alone must not make them look dear beside the steps (and push every draft to a
    small k). The smallest verify, timed again in the second batch, sets its scale."""
    import matformer.inference.speculative as spec

    model = tiny_lm(9)
    batches: list[list] = []

    def fake(fns, device, reps, warm):  # the first batch at 1x, the second under a 1.5x burst
        batches.append(list(fns))
        burst = 1.0 if len(batches) == 1 else 1.5
        return {key: burst * (2.0 + 0.1 * key if isinstance(key, int) else
                              2.0 + 0.1 * key[1] if isinstance(key, tuple) else 1.0)
                for key in fns}

    monkeypatch.setattr(spec, "timed_together", fake)
    target = Setting(model.stored_widths, model.stored_kv_heads)
    dec = StaticDecoder(model, 1, 32)
    dec.prefill([torch.tensor(PROMPT)])
    drafts = spec._drafts(model, target, WidthRequest(), True, None)
    costs = spec.measure_costs(model, dec, target, drafts, {}, [1, 2, 3, 4])
    assert batches[1] == [1, 2, 4]  # the smallest again beside the others
    assert costs.measured_ks == [1, 2, 4]
    assert costs.verify == pytest.approx({1: 2.1, 2: 2.2, 3: 2.3, 4: 2.4})
    assert costs.target_step == 1.0


def test_auto_where_the_output_layer_dominates_is_generate_itself(one_thread) -> None:
    """A large vocabulary on a tiny model (SmolLM2-135M's case, where the 49,152 x 576 output
    layer does not shrink with the FFN): even a draft that is always accepted and costs only
    its share of the multiply-adds cannot pay, which the parameter counts alone say. `auto` is
    then `generate` on its first call: no timing, no probe, the same forwards and tokens."""
    model = tiny_lm(0, vocab_size=32768)
    plain, n_plain = _counted(model, lambda: generate(model, PROMPT, 16, ignore_eos=True))
    auto, n_auto = _counted(model, lambda: speculative_generate(
        model, PROMPT, 16, draft_tier="auto", ignore_eos=True))
    assert auto.tokens == plain.tokens and n_auto == n_plain == 16
    assert auto.extra["choice"].draft is None and auto.extra["choosing_seconds"] == 0.0
    assert "even if every draft is accepted" in auto.extra["choice"].reason
    assert "costs" not in auto.extra and "probe" not in auto.extra


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.3, "top_k": 20, "seed": 3}],
                         ids=["greedy", "sampled"])
def test_auto_first_call_probes_and_decodes_plainly_when_no_draft_can_pay(
        sampling, one_thread) -> None:
    """No costs measured yet (a first call) and widths that disagree: `auto` decodes the first
    PROBE_TOKENS plainly, runs the widest draft once over them (its agreement bounds every
    draft's acceptance), finds that no draft could pay even at ideal costs, and decodes on
    plainly on the same cache: plain decoding's tokens (the same sampled ones too: the probe
    draws nothing) with exactly one forward more, nothing timed, nothing drafted."""
    model = tiny_lm(0, distinct=True)
    plain, n_plain = _counted(model, lambda: generate(model, PROMPT, 24, ignore_eos=True,
                                                      **sampling))
    auto, n_auto = _counted(model, lambda: speculative_generate(
        model, PROMPT, 24, draft_tier="auto", ignore_eos=True, **sampling))
    assert auto.tokens == plain.tokens and n_auto == n_plain + 1
    assert auto.stats.drafted == auto.stats.draft_forwards == 0
    assert auto.stats.target_forwards == plain.stats.target_forwards == 24
    probe = auto.extra["probe"]
    assert probe["tokens"] == PROBE_TOKENS and probe["draft"] == NAMES[0]
    assert probe["best_speedup"] < PAY_MARGIN and probe["ideal_costs"]
    assert auto.extra["choice"].draft is None and "costs" not in auto.extra
    assert auto.extra["choice"].reason.startswith("no draft can pay: tier 1")
    assert cached_costs(model, next(iter(_cost_keys(model)), ())) is None
    # Later calls in the process reuse the probe's verdict: `generate` itself, not even the
    # probe's forward, until every REPROBE_EVERY-th call probes again.
    for call in range(2, REPROBE_EVERY + 2):
        again, n_again = _counted(model, lambda: speculative_generate(
            model, PROMPT, 24, draft_tier="auto", ignore_eos=True, **sampling))
        assert again.tokens == plain.tokens
        probes = call % REPROBE_EVERY == 1
        assert n_again == n_plain + probes and ("probe" in again.extra) == probes
        if not probes:
            assert "earlier calls' probes found" in again.extra["choice"].reason


def _cost_keys(model) -> list:
    from matformer.inference.speculative import _COSTS

    return list(_COSTS.get(model, {}))


def test_tail_agreement_is_the_prompts_agreement_on_its_last_tokens_and_restores_the_cache(
        one_thread) -> None:
    """A named draft's first prior: its agreement with the target on the prompt's last tokens
    in the cache, as `prompt_agreement` over the whole prompt counts those positions, with the
    decoder's own forwards (the C++ step's where it runs, eager otherwise); the cache and the
    decoder's column are as they were."""
    model = tiny_lm(2, distinct=True)
    target = Setting(model.stored_widths, model.stored_kv_heads)
    drafts = [Draft(NAMES[t - 1], model.resolve_widths(tier=t), kv_heads=list(target.kv_heads))
              for t in (1, 3)]
    ids = torch.tensor([PROMPT])
    n = 5
    with torch.inference_mode():  # the reference: both widths over the whole prompt
        want = {}
        p = model(ids)[0, :-1].argmax(-1)[-n:]
        for d in drafts:
            with model.running(d.setting):
                q = model(ids)[0, :-1].argmax(-1)[-n:]
            want[d.name] = float((p == q).float().mean())
    for compile in (False, True):
        with torch.inference_mode():
            dec = StaticDecoder(model, 1, 64, compile=compile)
            dec.prefill([ids[0, :-1]])
            before = [(k.clone(), v.clone()) for k, v in zip(dec.cache.k, dec.cache.v,
                                                            strict=True)]
            pos = dec.pos
            got = tail_agreement(model, dec, ids, target, drafts, Sampler(), n=n)
            assert got == want, compile
            assert dec.pos == pos and model.widths == target.widths
            for (k, v), (k0, v0) in zip(zip(dec.cache.k, dec.cache.v, strict=True), before,
                                        strict=True):
                assert torch.equal(k, k0) and torch.equal(v, v0)


def _judged_rounds(monkeypatch) -> list[tuple[int, int]]:
    """(drafts, accepted) of every greedy round from here on (`greedy_accept`'s calls)."""
    import matformer.inference.speculative as spec

    rounds: list[tuple[int, int]] = []
    real = spec.greedy_accept
    monkeypatch.setattr(spec, "greedy_accept",
                        lambda d, b: rounds.append((len(d), real(d, b)[0])) or real(d, b))
    return rounds


def _judged(rounds: list[tuple[int, int]]) -> int:
    """The drafts the verifier tested: the accepted ones and each round's first rejected."""
    return sum(n + (n < k) for k, n in rounds)


def test_a_later_call_takes_its_first_prior_from_earlier_rounds(monkeypatch, one_thread) -> None:
    """A named draft with k chosen (`draft_tokens="auto"`): the first call measures the prompt's
    agreement; its rounds' acceptance is kept on the costs, and a later call with the same costs
    starts from it without measuring anything; output stays the target's greedy output."""
    import matformer.inference.speculative as spec

    model = tiny_lm(2)
    measured: list[int] = []
    real = spec.tail_agreement
    monkeypatch.setattr(spec, "tail_agreement",
                        lambda *a, **k: measured.append(1) or real(*a, **k))
    rounds = _judged_rounds(monkeypatch)
    plain = generate(model, PROMPT, 64, ignore_eos=True)
    kw = dict(draft_tier=3, draft_tokens="auto", ignore_eos=True)
    first = speculative_generate(model, PROMPT, 64, **kw)
    costs = first.extra["costs"]
    assert measured == [1] and first.tokens == plain.tokens
    acc, seen = costs.observed.accepted[NAMES[2]]
    assert seen == 0.5 * _judged(rounds) and acc == 0.5 * first.stats.accepted
    assert seen >= PRIOR_WEIGHT
    rounds.clear()
    second = speculative_generate(model, PROMPT, 64, costs=costs, **kw)
    assert measured == [1] and second.tokens == plain.tokens
    assert costs.observed.accepted[NAMES[2]][1] == 0.5 * (seen + _judged(rounds))


def test_acceptance_counts_the_drafts_the_verifier_judged(monkeypatch) -> None:
    """A round's drafts after its first rejection were never tested: the acceptance kept for
    later choices is accepted over judged (the accepted ones and the first rejected), the
    per-draft probability `expected_tokens` takes, not accepted over drafted."""
    rounds = _judged_rounds(monkeypatch)
    model = tiny_lm(2)
    costs = DecodeCosts(1.0, dict.fromkeys(NAMES, 0.1), dict.fromkeys(range(1, 9), 1.0))
    out = speculative_generate(model, PROMPT, 48, draft_tier=3, draft_tokens=3, costs=costs,
                               ignore_eos=True)
    assert out.tokens == generate(model, PROMPT, 48, ignore_eos=True).tokens
    assert sum(k for k, _ in rounds) == out.stats.drafted
    assert _judged(rounds) < out.stats.drafted  # some round was rejected before its last draft
    acc, seen = costs.observed.accepted[NAMES[2]]
    assert (acc, seen) == (0.5 * out.stats.accepted, 0.5 * _judged(rounds))
    # `draft_tier="auto"` (plain decoding an option) keeps the lower estimate, every drafted
    # token counted: where drafting is marginal it errs toward plain decoding
    rounds.clear()
    costs = DecodeCosts(1.0, dict.fromkeys(NAMES, 0.01), dict.fromkeys(range(1, 9), 1.0),
                        plain_step=1.0)
    out = speculative_generate(model, PROMPT, 48, draft_tier="auto", costs=costs,
                               ignore_eos=True)
    counted = sum(v[1] for v in costs.observed.accepted.values())
    assert out.stats.drafted > 0 and counted == 0.5 * out.stats.drafted


def test_probe_agreement_is_the_drafts_teacher_forced_steps_and_restores_the_cache(
        one_thread) -> None:
    """The probe's count equals what draft steps would give, fed the target's tokens one at a
    time after the target's cache (a reference built step by step on a copy of the cache), and
    the target's keys and values in the probed columns are bit for bit what they were."""
    model = tiny_lm(2, distinct=True)
    target = Setting(model.stored_widths, model.stored_kv_heads)
    n = 6
    with torch.inference_mode():
        dec = StaticDecoder(model, 1, len(PROMPT) + n + 1)
        head, rows, _ = _plain_start(model, dec, torch.tensor([PROMPT]), Sampler(), set(), n,
                                     GenerationStats(len(PROMPT)), None, 0.0)
        inputs = torch.tensor([[PROMPT[-1], *head[:-1]]])
        before = [(k.clone(), v.clone()) for k, v in zip(dec.cache.k, dec.cache.v, strict=True)]
        for widths, name in [(model.resolve_widths(tier=t), NAMES[t - 1]) for t in (1, 3)]:
            draft = Draft(name, widths, kv_heads=list(target.kv_heads))
            got = probe_agreement(model, dec, target, draft, inputs, rows, Sampler())
            for (k, v), (k0, v0) in zip(zip(dec.cache.k, dec.cache.v, strict=True), before,
                                        strict=True):
                assert torch.equal(k, k0) and torch.equal(v, v0)
            assert model.widths == target.widths
            ref = model.new_cache(1, dec.pos)
            for (k, v), (k0, v0) in zip(zip(ref.k, ref.v, strict=True), before, strict=True):
                k.copy_(k0[:, :, :dec.pos])
                v.copy_(v0[:, :, :dec.pos])
            ref.length = dec.pos - n
            agree = 0
            with model.running(draft.setting):
                for i in range(n):
                    q = model(inputs[:, i:i + 1], cache=ref)[0, -1]
                    agree += int(q.argmax()) == head[i]
            assert got == agree
    assert 0 < got < n or agree in (0, n)


def test_step_work_is_the_multiply_adds_of_a_step(one_thread) -> None:
    """`step_work` (what the ideal costs scale by) against torch's FLOP counter on a one-token
    forward at the target and at every tier: multiply-adds are half the FLOPs (the one-token
    attention's own few are the difference)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_lm(0, heads=True)
    for tier in range(4):
        setting = Setting(model.resolve_widths(tier=tier), model.stored_kv_heads)
        with model.running(setting), torch.inference_mode(), \
                FlopCounterMode(display=False) as counter:
            model(torch.tensor([[3]]))
        macs = counter.get_total_flops() / 2
        assert abs(step_work(model, setting) - macs) <= 0.01 * macs, (tier, macs)


def test_acceptance_bound_and_ideal_costs() -> None:
    """The bound is optimistic (above the estimate, 0 of n is not certainty) and tightens with
    more tokens; ideal costs are the plain step times each draft's share of the work."""
    assert acceptance_bound(0, 8) > 0 and acceptance_bound(8, 8) == 1.0
    assert acceptance_bound(2, 8) > 0.25 > acceptance_bound(20, 80) - 0.2
    assert acceptance_bound(20, 80) < acceptance_bound(2, 8)
    model = tiny_lm(0)
    target = Setting(model.stored_widths, model.stored_kv_heads)
    drafts = [Draft(NAMES[t - 1], model.resolve_widths(tier=t), kv_heads=list(target.kv_heads))
              for t in (1, 2, 3)]
    costs = ideal_costs(model, target, drafts, [1, 2], 2.0)
    assert costs.plain == costs.target_step == costs.verify[2] == 2.0
    for d in drafts:
        assert costs.draft_steps[d.name] == pytest.approx(
            2.0 * step_work(model, d.setting) / step_work(model, target))
    assert costs.draft_steps[NAMES[0]] > costs.draft_steps[NAMES[2]]


@pytest.mark.slow
def test_auto_where_drafting_cannot_pay_runs_at_plain_speed(one_thread) -> None:
    """The debug model, eager: drafting cannot pay (a draft step costs about a plain step).
    `auto` within 5% of plain decoding's tokens/s (median of interleaved repeats), same
    output. A timing test: slow, run outside CI."""
    model = tiny_lm(0)
    # costs, once (timed after the plain start and the probe, so the call outlasts them)
    speculative_generate(model, PROMPT, PROBE_TOKENS + 2, draft_tier="auto", ignore_eos=True)
    plain_rates, auto_rates = [], []
    for _ in range(15):
        p = generate(model, PROMPT, 64, ignore_eos=True)
        a = speculative_generate(model, PROMPT, 64, draft_tier="auto", ignore_eos=True)
        assert a.tokens == p.tokens
        plain_rates.append(p.stats.tokens_per_s)
        auto_rates.append(a.stats.tokens_per_s)
    ratio = statistics.median(auto_rates) / statistics.median(plain_rates)
    assert a.extra["choice"].draft is None, a.extra["choice"]
    assert ratio >= 0.95, (ratio, a.extra["choice"], a.extra["costs"])
    assert torch.get_num_threads() == 1
