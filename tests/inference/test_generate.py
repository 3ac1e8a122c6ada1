"""Generation at any width and speculative decoding inside one model (matformer.generate)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from matformer import MatFormerConfig, MatFormerLM
from matformer.errors import ConfigError, DataError, TierError
from matformer.inference.decode import generate, generate_batch
from matformer.inference.sampling import Sampler
from matformer.inference.speculative import speculative_generate
from tests.conftest import tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")




PROMPT = [5, 17, 300, 42, 8, 99, 123]


def test_cached_decoding_equals_uncached() -> None:
    model = tiny_lm(distinct=True)
    for widths in (None, [64, 256]):
        a = generate(model, PROMPT, 30, ignore_eos=True, widths=widths)
        b = generate(model, PROMPT, 30, ignore_eos=True, widths=widths, use_cache=False)
        assert a.tokens == b.tokens
        assert len(a.tokens) == 30
        assert a.stats.target_forwards == 30


@pytest.mark.parametrize(
    "target,draft,k",
    [
        (dict(), dict(draft_tier=1), 3),
        (dict(), dict(draft_tier=2), 1),
        (dict(), dict(draft_tier=3), 4),
        (dict(), dict(draft_tier=3), "adaptive"),
        (dict(), dict(draft_widths=[32, 128]), 2),  # Mix'n'Match draft
        (dict(tier=1), dict(draft_tier=3), 3),  # a smaller target width
        (dict(widths=[128, 256]), dict(draft_tier=2), 5),  # Mix'n'Match target
    ],
    ids=["t1-k3", "t2-k1", "t3-k4", "t3-adaptive", "mix-draft", "target-t1", "mix-target"],
)
def test_greedy_speculative_equals_plain_decoding(target, draft, k) -> None:
    model = tiny_lm(distinct=True)
    plain = generate(model, PROMPT, 40, ignore_eos=True, **target)
    spec = speculative_generate(model, PROMPT, 40, draft_tokens=k, ignore_eos=True,
                                **target, **draft)
    assert spec.tokens == plain.tokens
    s = spec.stats
    # Drafts were both accepted and rejected, so both branches ran.
    assert 0 < s.accepted < s.drafted
    # Every round emits its accepted drafts plus one verifier token.
    assert s.new_tokens == s.accepted + s.target_forwards - 1  # -1: the prompt's forward
    assert model.widths == model.stored_widths  # the setting is restored


def test_speculative_cache_holds_the_verifier_entries() -> None:
    model = tiny_lm(1, distinct=True)
    out = speculative_generate(model, PROMPT, 25, draft_tier=3, draft_tokens=4, ignore_eos=True,
                               return_cache=True)
    cache = out.extra["cache"]
    seq = torch.tensor([out.sequence])
    # The cache holds every emitted token but the last; its entries must be the target width's.
    assert cache.length == seq.shape[1] - 1
    ref = model.new_cache(1, seq.shape[1])
    with torch.no_grad():
        model(seq[:, :-1], cache=ref)
    for i in range(model.config.num_hidden_layers):
        torch.testing.assert_close(cache.k[i][:, :, : cache.length], ref.k[i][:, :, : cache.length])
        torch.testing.assert_close(cache.v[i][:, :, : cache.length], ref.v[i][:, :, : cache.length])
    # ... and not the draft width's (a check that would fail if the draft's entries were kept).
    draft_ref = model.new_cache(1, seq.shape[1])
    with torch.no_grad(), model.at_width(tier=3):
        model(seq[:, :-1], cache=draft_ref)
    assert not torch.allclose(cache.k[1][:, :, 1 : cache.length], draft_ref.k[1][:, :, 1 : cache.length])


def test_width_switching_between_calls_on_one_model() -> None:
    model = tiny_lm(2, distinct=True)
    a2 = generate(model, PROMPT, 20, ignore_eos=True, tier=2)
    assert model.widths == model.stored_widths  # a call's width doesn't stick
    model.set_widths(tier=1)
    a1 = generate(model, PROMPT, 20, ignore_eos=True)
    assert a1.widths == [128, 128]
    b2 = generate(model, PROMPT, 20, ignore_eos=True, tier=2)
    assert model.widths == [128, 128]  # restored to the model's own setting
    model.set_widths()
    a0 = generate(model, PROMPT, 20, ignore_eos=True)
    assert a2.tokens == b2.tokens
    assert len({tuple(a0.tokens), tuple(a1.tokens), tuple(a2.tokens)}) == 3
    # Each call really ran at its width: same tokens as a fresh uncached run at that width.
    with model.at_width(tier=1):
        ref1 = generate(model, PROMPT, 20, ignore_eos=True, use_cache=False)
    assert ref1.tokens == a1.tokens
    assert generate(model, PROMPT, 20, ignore_eos=True, tier=2, use_cache=False).tokens == a2.tokens


def test_eos_stops_and_stream_sees_every_token() -> None:
    model = tiny_lm(3, distinct=True)
    free = generate(model, PROMPT, 30, ignore_eos=True)
    eos = free.tokens[6]
    first = free.tokens.index(eos)
    seen: list[int] = []
    out = generate(model, PROMPT, 30, eos_token_id=eos, stream=seen.extend)
    assert out.tokens == free.tokens[: first + 1]
    assert out.stats.stop_reason == "eos"
    assert seen == out.tokens
    seen = []
    spec = speculative_generate(model, PROMPT, 30, eos_token_id=eos, draft_tier=2,
                                stream=seen.extend)
    assert spec.tokens == out.tokens and seen == spec.tokens
    assert spec.stats.stop_reason == "eos"


def test_seeded_sampling_is_reproducible_and_respects_top_k() -> None:
    model = tiny_lm(4, distinct=True)
    kw = dict(temperature=1.0, seed=7, ignore_eos=True)
    a = generate(model, PROMPT, 25, **kw)
    assert generate(model, PROMPT, 25, **kw).tokens == a.tokens
    assert generate(model, PROMPT, 25, **{**kw, "seed": 8}).tokens != a.tokens
    s = speculative_generate(model, PROMPT, 25, draft_tier=2, **kw)
    assert speculative_generate(model, PROMPT, 25, draft_tier=2, **kw).tokens == s.tokens
    # top_k=1 is greedy whatever the temperature.
    greedy = generate(model, PROMPT, 25, ignore_eos=True)
    assert generate(model, PROMPT, 25, temperature=2.0, top_k=1, seed=1,
                    ignore_eos=True).tokens == greedy.tokens
    assert speculative_generate(model, PROMPT, 25, temperature=2.0, top_k=1, seed=1,
                                draft_tier=3, ignore_eos=True).tokens == greedy.tokens


def test_sampler_top_k_top_p() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    s = Sampler(1.0, top_k=2)
    p = s.probs(logits)[0]
    assert (p[2:] == 0).all() and abs(p.sum().item() - 1) < 1e-6
    full = torch.softmax(logits[0], -1)
    # top_p: the smallest set of most likely tokens holding top_p of the mass.
    cut = full[0].item() + 0.01
    p = Sampler(1.0, top_p=cut).probs(logits)[0]
    assert (p[:2] > 0).all() and (p[2:] == 0).all()
    p = Sampler(1.0, top_p=full[0].item() - 0.01).probs(logits)[0]
    assert p[0].item() == pytest.approx(1.0) and (p[1:] == 0).all()


# ---- the sampling acceptance rule keeps the target distribution ----------------------------------


def _chi2_pvalue(observed: torch.Tensor, expected_p: torch.Tensor, n: int) -> float:
    """Pearson chi-square goodness of fit, cells of expected count < 5 pooled; p-value from the
    Wilson-Hilferty normal approximation (no scipy needed)."""
    expected = expected_p.double() * n
    obs = observed.double()
    small = expected < 5
    e = torch.cat([expected[~small], expected[small].sum().view(1)])
    o = torch.cat([obs[~small], obs[small].sum().view(1)])
    keep = e > 0
    e, o = e[keep], o[keep]
    stat = float(((o - e) ** 2 / e).sum())
    dof = len(e) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_speculative_sampling_keeps_the_target_distribution() -> None:
    V, N = 8, 1000
    model = tiny_lm(0, vocab_size=V, eos_token_id=None, distinct=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # TV(target, draft) about 0.4 on the first token
    prompt = [1, 2, 3]
    sampler = Sampler(1.0)
    # Exact target distribution of (x1, x2) and of x3.
    with torch.no_grad():
        p1 = sampler.probs(model(torch.tensor([prompt]))[0, -1])  # (V,)
        two = torch.tensor([prompt + [a] for a in range(V)])
        p2 = sampler.probs(model(two)[:, -1])  # (V, V): p(x2 | x1)
        joint12 = (p1[:, None] * p2).reshape(-1)  # (V*V,)
        three = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = (joint12[:, None] * sampler.probs(model(three)[:, -1])).sum(0)  # (V,)
        with model.at_width(tier=3):
            q1 = sampler.probs(model(torch.tensor([prompt]))[0, -1])
    assert 0.5 * (p1 - q1).abs().sum() > 0.3

    c12 = torch.zeros(V * V)
    c3 = torch.zeros(V)
    accepted = drafted = 0
    for i in range(N):
        out = speculative_generate(model, prompt, 3, draft_tier=3, draft_tokens=2,
                                   temperature=1.0, seed=i)
        x1, x2, x3 = out.tokens
        c12[x1 * V + x2] += 1
        c3[x3] += 1
        accepted += out.stats.accepted
        drafted += out.stats.drafted
    assert 0.1 < accepted / drafted < 0.9  # both acceptance and resampling were exercised
    assert _chi2_pvalue(c12, joint12, N) > 1e-3
    assert _chi2_pvalue(c3, p3, N) > 1e-3
    # The same test has the power to reject a wrong distribution: the draft width's own samples.
    d1 = torch.zeros(V)
    for i in range(N // 3):
        d1[generate(model, prompt, 1, tier=3, temperature=1.0, seed=i).tokens[0]] += 1
    assert _chi2_pvalue(d1, p1, N // 3) < 1e-6


# ---- errors --------------------------------------------------------------------------------------


def test_bad_requests_are_clear_errors() -> None:
    model = tiny_lm(distinct=True)
    with pytest.raises(DataError, match="empty"):
        generate(model, [], 5)
    with pytest.raises(DataError, match="max_position_embeddings"):
        generate(model, PROMPT, 1000)
    # an id outside the vocabulary: a DataError naming it, not an IndexError from the embedding
    with pytest.raises(DataError, match=f"token id {model.config.vocab_size}\\b"):
        generate(model, [1, model.config.vocab_size], 5)
    with pytest.raises(DataError, match="token id -1"):
        speculative_generate(model, [-1, 2], 5)
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, PROMPT, 5, temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, PROMPT, 5, temperature=1, top_p=0)
    with pytest.raises(ConfigError, match="draft_tokens"):
        speculative_generate(model, PROMPT, 5, draft_tokens=0)
    # A model that stores tier 1 can't run tier 0, for the target or the draft.
    small = MatFormerLM(model.config.with_widths(128)).eval()
    with pytest.raises(TierError, match="tier 0"):
        generate(small, PROMPT, 5, tier=0)
    with pytest.raises(TierError):
        speculative_generate(small, PROMPT, 5, draft_tier=0)
    assert small.widths == [128, 128]
    # the default draft of a sliced model is still its smallest tier
    out = speculative_generate(small, PROMPT, 5, ignore_eos=True)
    assert out.draft_widths == [32, 32]


# ---- batched decoding ----------------------------------------------------------------------------


PROMPTS = [[5, 17, 300, 42, 8, 99, 123], [7], [400, 3, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.mark.parametrize("width", [dict(), dict(tier=2), dict(widths=[128, 64])],
                         ids=["stored", "tier2", "mix"])
def test_batched_rows_equal_each_prompt_alone(width) -> None:
    model = tiny_lm(5, distinct=True)
    batch = generate_batch(model, PROMPTS, 24, ignore_eos=True, **width)
    for p, out in zip(PROMPTS, batch, strict=True):
        alone = generate(model, p, 24, ignore_eos=True, **width)
        assert out.tokens == alone.tokens and out.prompt == p
        assert out.widths == alone.widths
    assert model.widths == model.stored_widths
    # Each row stops at its own EOS; the others run on.
    eos = batch[2].tokens[3]
    stopped = generate_batch(model, PROMPTS, 24, eos_token_id=eos, **width)
    for out, free in zip(stopped, batch, strict=True):
        cut = free.tokens.index(eos) + 1 if eos in free.tokens else len(free.tokens)
        assert out.tokens == free.tokens[:cut]
        assert out.stats.stop_reason == ("eos" if eos in free.tokens else "length")
    # Tokens are read back every SYNC_EVERY (16) steps: an EOS inside the second chunk stops the
    # same way, and with `stream` (read every step) too.
    eos = batch[0].tokens[18]
    seen: list[int] = []
    for stream in (None, seen.extend):
        stopped = generate_batch(model, PROMPTS, 24, eos_token_id=eos, stream=stream, **width)
        for out, free in zip(stopped, batch, strict=True):
            cut = free.tokens.index(eos) + 1 if eos in free.tokens else len(free.tokens)
            assert out.tokens == free.tokens[:cut]
    assert seen == stopped[0].tokens


# ---- compiled decoding -----------------------------------------------------------------------------


def test_compiled_decoding_equals_eager_and_keeps_one_graph_per_width() -> None:
    """torch.compile (inductor) of the one-token step: greedy output identical to eager at two
    widths and under speculative decoding; switching back to a width compiles nothing."""
    from torch._dynamo.utils import counters

    model = tiny_lm(6, distinct=True)
    eager = {t: generate(model, PROMPT, 20, ignore_eos=True, tier=t).tokens for t in (0, 2)}
    for t in (0, 2):
        assert generate(model, PROMPT, 20, ignore_eos=True, tier=t, compile=True).tokens == eager[t]
    graphs = counters["stats"]["unique_graphs"]
    for t in (0, 2, 0):  # both widths compiled above: no new graph
        assert generate(model, PROMPT, 20, ignore_eos=True, tier=t, compile=True).tokens == eager[t]
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_compiled_speculative_and_batched_decoding_equal_eager() -> None:
    model = tiny_lm(6, distinct=True)
    plain = generate(model, PROMPT, 20, ignore_eos=True)
    spec = speculative_generate(model, PROMPT, 20, draft_tier=2, draft_tokens=2, ignore_eos=True,
                                compile=True)
    assert spec.tokens == plain.tokens and 0 < spec.stats.accepted < spec.stats.drafted
    batch = generate_batch(model, PROMPTS, 12, ignore_eos=True, compile=True)
    for p, out in zip(PROMPTS, batch, strict=True):
        assert out.tokens == generate(model, p, 12, ignore_eos=True).tokens


def test_width_switches_do_not_recompile(monkeypatch) -> None:
    """Counted with a counting backend: one graph per (width, tokens per call), however often
    draft and verifier alternate (the compiled graphs: the C++ step, which compiles nothing, is
    off)."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setenv("MATFORMER_DECODE_STEP", "0")

    from matformer.inference.static_cache import StaticDecoder

    torch._dynamo.reset()
    counter = CompileCounter()
    model = tiny_lm(7, distinct=True)
    dec = StaticDecoder(model, 1, 64, compile=True, backend=counter)
    with torch.inference_mode():
        dec.prefill([torch.tensor(PROMPT)])
        tok = torch.tensor([[3]])
        for _ in range(3):  # draft, draft, verify(3 tokens), crop: as speculative rounds do
            start = dec.pos
            for tier in (2, 2):
                model.set_widths(tier=tier)
                dec.step(tok)
            dec.crop(start)
            model.set_widths()
            dec.forward(torch.tensor([[3, 4, 5]]))
            dec.crop(start + 1)
        model.set_widths(tier=1)
        dec.step(tok)
    model.set_widths()
    # (tier 2, 1 token), (tier 0, 3 tokens), (tier 1, 1 token)
    assert counter.frame_count == 3
    torch._dynamo.reset()


def test_the_benchmark_sequence_compiles_each_setting_once(monkeypatch) -> None:
    """benchmarks/speed/decode.py's calls (plain decoding at every tier, `draft_tier="auto"` measuring
    costs over every tier and k up to 6, tiers 1-3 as named drafts, a separate draft model, over
    several prompts) with a counting backend: one graph per distinct (model, widths, KV heads,
    tokens) the decoders ran, and a second identical pass compiles nothing. Issue 13's H100 run
    compiled more: the token tensor's strides and inference-ness were part of the graph key, so
    measure_costs' graphs were not the rounds' and the rounds compiled theirs while timed."""
    monkeypatch.setenv("MATFORMER_DECODE_STEP", "0")  # the compiled graphs
    from torch._dynamo.testing import CompileCounter

    import matformer.inference.static_cache as decoding

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = decoding.compiled_forward
    monkeypatch.setattr(decoding, "compiled_forward",
                        lambda mode=None, backend="inductor": compiled(None, counter))
    used: set[tuple] = set()
    forward = decoding.StaticDecoder.forward

    def recording(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        used.add((id(m), tuple(m.widths), tuple(m.layer_kv_heads), tuple(ids.shape)))
        return forward(self, ids)

    monkeypatch.setattr(decoding.StaticDecoder, "forward", recording)
    model, draft = tiny_lm(11, distinct=True), tiny_lm(12, intermediate_size=32, distinct=True)
    prompts = [PROMPT, [9, 8, 7, 6, 5], [300, 1, 2, 400, 3, 4, 5, 6, 7]]
    kw = dict(ignore_eos=True, compile=True, max_draft_tokens=6)

    def sequence() -> None:
        for tier in range(4):
            generate(model, PROMPT, 12, tier=tier, ignore_eos=True, compile=True)
        # (no costs when the probe settles on plain decoding: the named drafts measure theirs)
        costs = speculative_generate(model, PROMPT, 12, draft_tier="auto", **kw).extra.get("costs")
        for p in prompts:
            generate(model, p, 12, ignore_eos=True, compile=True)
            speculative_generate(model, p, 12, draft_tier="auto", costs=costs, **kw)
            for tier in (1, 2, 3):
                speculative_generate(model, p, 12, draft_tier=tier, draft_tokens="auto",
                                     costs=costs, **kw)
            speculative_generate(model, p, 12, draft_model=draft, draft_tokens="auto", **kw)

    sequence()
    n = len(used)
    assert counter.frame_count == n
    full, small = tuple(model.stored_widths), tuple(draft.stored_widths)
    heads = tuple(model.stored_kv_heads)
    # steps and the verifies measure_costs times (k = 1, 2, 4 and the largest, 6); the rounds
    # may also run an interpolated k (3 or 5), each then one graph more
    want = {(id(model), full, heads, (1, k + 1)) for k in (0, 1, 2, 4, 6)}
    want |= {(id(model), tuple(model.resolve_widths(tier=t)), heads, (1, 1)) for t in (1, 2, 3)}
    want.add((id(draft), small, tuple(draft.stored_kv_heads), (1, 1)))
    assert want <= used <= want | {(id(model), full, heads, (1, k + 1)) for k in (3, 5)}
    sequence()
    assert counter.frame_count == n and len(used) == n
    torch._dynamo.reset()


# ---- the choice of draft and k -----------------------------------------------------------------------


def test_expected_tokens_and_the_cost_model() -> None:
    from matformer.inference.speculative import (
        DecodeCosts,
        choose_draft,
        expected_speedup,
        expected_tokens,
    )

    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    # Monte Carlo of i.i.d. acceptance agrees with the closed form.
    g = torch.Generator().manual_seed(0)
    acc = (torch.rand(20000, 3, generator=g) < 0.7).int()
    n = acc.cumprod(1).sum(1) + 1
    assert float(n.float().mean()) == pytest.approx(expected_tokens(0.7, 3), rel=0.02)
    assert expected_speedup(0.8, 2, 0.25, 1.2, 1.0) == pytest.approx(
        expected_tokens(0.8, 2) / (2 * 0.25 + 1.2))
    # The measurement: 26.9 ms full step, 8.3 ms tier-3 step, verify of 3 tokens 30.7
    # ms and 5 tokens 53.5 ms: at 85% acceptance k=2 pays (~1.46x), k=4 does not beat it.
    costs = DecodeCosts(target_step=26.9, draft_steps={"tier 3": 8.3, "tier 1": 20.0},
                        verify={2: 30.7, 4: 53.5})
    c = choose_draft(costs, {"tier 3": 0.85, "tier 1": 0.95})
    assert (c.draft, c.k) == ("tier 3", 2)
    assert c.expected_speedup == pytest.approx(
        expected_tokens(0.85, 2) / (2 * 8.3 + 30.7) * 26.9)
    # Verification as cheap as a step (memory-bound GPU): longer drafts pay.
    cheap = DecodeCosts(26.9, {"tier 3": 8.3}, {k: 27.0 for k in range(1, 9)})
    assert choose_draft(cheap, {"tier 3": 0.9}).k > 2
    # Nothing pays at low acceptance: plain decoding (or, not allowed, the least bad pair).
    assert choose_draft(costs, {"tier 3": 0.1, "tier 1": 0.1}).draft is None
    forced = choose_draft(costs, {"tier 3": 0.1, "tier 1": 0.1}, allow_plain=False)
    assert forced.draft == "tier 3" and forced.expected_speedup < 1


def test_auto_draft_explores_a_draft_whose_prompt_agreement_was_low_by_chance() -> None:
    """The prior is a few prompt tokens; only the draft in use is observed. With the CPU
    benchmark's costs, tier 3 at a prior of 9/16 loses to tier 2 on estimates, but its upper
    bound would win: auto tries it (explore=True), and once tier 3's observed acceptance is in,
    it is chosen on its estimate. A draft that cannot win even optimistically is not tried."""
    from matformer.inference.speculative import DecodeCosts, Draft, DraftRound, rechoose_draft

    costs = DecodeCosts(7.5, {"tier 2": 2.33, "tier 3": 1.76},
                        {1: 8.57, 2: 9.20, 3: 12.22, 4: 12.49})
    drafts = [Draft("tier 2", [1024]), Draft("tier 3", [512])]
    state = DraftRound(draft=drafts[0], k=2, mode="auto", prior={"tier 2": 0.75, "tier 3": 0.5625},
                   plain_ok=True)
    state.seen["tier 2"] = [40, 46]
    extra: dict = {}
    assert state.acceptance()["tier 2"] > state.acceptance()["tier 3"]
    rechoose_draft(state, drafts, costs, [1, 2, 3, 4], extra)
    assert extra["choice"].explore and state.draft.name == "tier 3"
    state.seen["tier 3"] = [36, 40]  # what tier 3 then shows
    rechoose_draft(state, drafts, costs, [1, 2, 3, 4], extra)
    assert state.draft.name == "tier 3" and not extra["choice"].explore
    hopeless = DraftRound(draft=drafts[0], k=2, mode="auto", prior={"tier 2": 0.9, "tier 3": 0.05},
                      plain_ok=True)
    hopeless.seen["tier 2"] = [80, 90]
    rechoose_draft(hopeless, drafts, costs, [1, 2, 3, 4], extra)
    assert hopeless.draft.name == "tier 2" and not extra["choice"].explore


def test_auto_draft_follows_the_measured_costs() -> None:
    """draft_tier='auto' picks what the costs imply (given costs here, so the test doesn't
    depend on this machine's timings), re-measures when none are given, and the output stays
    the target's greedy output."""
    from matformer.inference.speculative import DecodeCosts

    torch.manual_seed(8)  # plain random init: the widths mostly agree, so drafting can pay
    model = MatFormerLM(MatFormerConfig.from_preset("debug")).eval()
    plain = generate(model, PROMPT, 30, ignore_eos=True)
    names = ["tier 1 (width 128)", "tier 2 (width 64)", "tier 3 (width 32)"]
    for cheap in names[1:]:
        steps = {n: (0.05 if n == cheap else 0.9) for n in names}
        costs = DecodeCosts(1.0, steps, {k: 1.0 + 0.05 * k for k in range(1, 9)})
        out = speculative_generate(model, PROMPT, 30, draft_tier="auto", costs=costs,
                                   ignore_eos=True)
        assert out.tokens == plain.tokens
        # the first choice is the costs'; later ones follow the rounds' observed wall time
        assert out.extra["first_choice"].draft == cheap and out.extra["costs"] is costs
        assert out.draft_widths == model.resolve_widths(tier=int(cheap[5]))
    # Costs that make drafting a loss: plain decoding, still the same tokens.
    slow = DecodeCosts(1.0, {n: 5.0 for n in names}, {k: 3.0 * k for k in range(1, 9)})
    out = speculative_generate(model, PROMPT, 30, draft_tier="auto", costs=slow, ignore_eos=True)
    assert out.extra["choice"].draft is None and out.stats.drafted == 0
    assert out.tokens == plain.tokens
    # A named draft with k from the costs drafts at its best k even then.
    named = speculative_generate(model, PROMPT, 30, draft_tier=3, draft_tokens="auto", costs=slow,
                                 ignore_eos=True)
    assert named.extra["choice"].draft == names[2] and named.extra["choice"].k >= 1
    assert named.stats.drafted > 0 and named.tokens == plain.tokens
    measured = speculative_generate(model, PROMPT, 30, draft_tier="auto", ignore_eos=True)
    c = measured.extra["costs"]
    assert set(c.draft_steps) == set(names) and sorted(c.verify) == list(range(1, 9))
    assert all(t > 0 for t in [c.target_step, *c.draft_steps.values(), *c.verify.values()])
    assert measured.tokens == plain.tokens


# ---- a separate draft model --------------------------------------------------------------------------


def _small_draft(seed: int, **overrides) -> MatFormerLM:
    """An independent model of the target's tier-3 size (same vocabulary)."""
    torch.manual_seed(seed)
    cfg = MatFormerConfig.from_preset("debug", intermediate_size=32, **overrides)
    return MatFormerLM(cfg).eval()


def test_separate_draft_model_greedy_equals_plain() -> None:
    model = tiny_lm(9, distinct=True)
    # A separate model object (own cache, own keys/values) holding the target's tier-1 weights.
    draft = copy.deepcopy(model).set_widths(tier=1)
    plain = generate(model, PROMPT, 40, ignore_eos=True)
    for k in (1, 3, "adaptive"):
        spec = speculative_generate(model, PROMPT, 40, draft_model=draft, draft_tokens=k,
                                    ignore_eos=True)
        assert spec.tokens == plain.tokens
        assert 0 < spec.stats.accepted < spec.stats.drafted
    # A draft that agrees with the target (the target itself as a separate model): every draft
    # accepted, so the catch-up feed of the last draft into the draft's own cache is exercised.
    same = speculative_generate(model, PROMPT, 40, draft_model=model, draft_tokens=3,
                                ignore_eos=True)
    assert same.tokens == plain.tokens and same.stats.accepted == same.stats.drafted
    with pytest.raises(ConfigError, match="vocabulary"):
        speculative_generate(model, PROMPT, 5, draft_model=_small_draft(1, vocab_size=300))


def test_separate_draft_model_sampling_keeps_the_target_distribution() -> None:
    V, N = 8, 600
    model = tiny_lm(0, vocab_size=V, eos_token_id=None, distinct=True)
    draft = _small_draft(3, vocab_size=V, eos_token_id=None)
    prompt = [1, 2, 3]
    sampler = Sampler(1.0)
    with torch.no_grad():
        p1 = sampler.probs(model(torch.tensor([prompt]))[0, -1])
        p2 = sampler.probs(model(torch.tensor([prompt + [a] for a in range(V)]))[:, -1])
        joint = (p1[:, None] * p2).reshape(-1)  # (V*V,) target's (x1, x2)
        q1 = sampler.probs(draft(torch.tensor([prompt]))[0, -1])
    assert 0.5 * (p1 - q1).abs().sum() > 0.1
    counts = torch.zeros(V * V)
    accepted = drafted = 0
    for i in range(N):
        out = speculative_generate(model, prompt, 2, draft_model=draft, draft_tokens=1,
                                   temperature=1.0, seed=i)
        counts[out.tokens[0] * V + out.tokens[1]] += 1
        accepted += out.stats.accepted
        drafted += out.stats.drafted
    assert 0.1 < accepted / drafted < 0.95
    assert _chi2_pvalue(counts, joint, N) > 1e-3


# ---- the verb ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory):
    """A debug checkpoint and a separate small one (tier-3 FFN size) with the same tokenizer."""
    from matformer.data.text import load_texts, save_tokenizer, split_texts, train_tokenizer
    from matformer.io.checkpoint import save_model

    texts, _ = split_texts(load_texts(None, max_bytes=100_000))
    tok = train_tokenizer(texts, 320)
    root = tmp_path_factory.mktemp("ckpts")
    for name, ffn in (("target", 256), ("small", 32)):
        torch.manual_seed(0)
        cfg = MatFormerConfig.from_preset("debug", vocab_size=tok.get_vocab_size(),
                                          intermediate_size=ffn)
        save_model(MatFormerLM(cfg).eval(), root / name)
        save_tokenizer(tok, root / name)
    return root / "target", root / "small"


def test_generate_verb_batch_auto_draft_and_draft_model(two_ckpts, tmp_path, capsys) -> None:
    from matformer.cli import main

    target, small = two_ckpts
    lines = ["def main(", "import os", "class A:\\n    x"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n\n")
    args = ["generate", str(target), "--max-new-tokens", "10", "--temperature", "0"]
    assert main([*args, "--prompts-file", str(tmp_path / "prompts.txt")]) == 0
    batch, err = capsys.readouterr()
    assert len(batch.splitlines()) == 3 and "3 prompts" in err
    for line, text in zip(batch.splitlines(), lines, strict=True):
        assert main([*args, "--prompt", text]) == 0
        alone = capsys.readouterr().out.rstrip("\n")
        assert line == alone.replace("\\", "\\\\").replace("\n", "\\n")
    assert main([*args, "--prompt", lines[0], "--draft-tier", "auto"]) == 0
    out, err = capsys.readouterr()
    assert "chose" in err and "verify of k+1 tokens" in err
    assert main([*args, "--prompt", lines[0]]) == 0
    assert capsys.readouterr().out == out
    assert main([*args, "--prompt", lines[0], "--draft-model", str(small), "--draft-tokens", "2"]) == 0
    assert capsys.readouterr().out == out
    # errors: one line, exit status 2
    assert main([*args, "--prompts-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main([*args, "--prompts-file", str(tmp_path / "prompts.txt"), "--draft-tier", "2"]) == 2
    assert "speculative" in capsys.readouterr().err
    assert main([*args, "--prompt", "x", "--draft-model", str(small), "--draft-tier", "2"]) == 2
    assert "not both" in capsys.readouterr().err


def test_speculative_draft_widths_are_one_request() -> None:
    """The draft's five keywords form one request: per-layer tiers, widths, and heads alone
    (the target's FFN widths, fewer heads); each greedy output is the target's."""
    model = tiny_lm(distinct=True)
    plain = generate(model, PROMPT, 20, ignore_eos=True, layer_tiers=[1, 0])
    for draft in (dict(draft_layer_tiers=[3, 2]), dict(draft_widths=64),
                  dict(draft_layer_tiers=[2, 2], draft_kv_heads=1),
                  dict(draft_layer_kv_heads=[1, 1])):
        out = speculative_generate(model, PROMPT, 20, ignore_eos=True, draft_tokens=3,
                                   layer_tiers=[1, 0], **draft)
        assert out.tokens == plain.tokens and out.widths == [128, 256], draft
    assert speculative_generate(model, PROMPT, 4, draft_layer_tiers=[3, 2]).draft_widths == [32, 64]
    out = speculative_generate(model, PROMPT, 4, draft_layer_kv_heads=[1, 1])
    assert out.draft_widths == out.widths and out.draft_kv_heads == [1, 1]
    with pytest.raises(TierError, match="exactly one of tier, layer_tiers, widths"):
        speculative_generate(model, PROMPT, 4, draft_tier=2, draft_widths=64)
    with pytest.raises(ConfigError, match="auto"):
        speculative_generate(model, PROMPT, 4, draft_tier="auto", draft_widths=64)
    assert model.widths == [256, 256]  # the caller's setting is back


def test_load_model_and_generate_verb_take_layer_tiers(two_ckpts, capsys) -> None:
    """Every verb that takes a width takes all five keywords: load_model(layer_tiers=...),
    `generate --layer-tiers` and `--draft-layer-tiers`."""
    from matformer.cli import main
    from matformer.io.checkpoint import load_model

    target, _ = two_ckpts
    model = load_model(target, layer_tiers=[2, 1])
    assert model.widths == [64, 128] and model.stored_widths == [256, 256]
    assert load_model(target, layer_tiers=[1, 1], kv_heads=1).layer_kv_heads == [1, 1]
    with pytest.raises(TierError, match="exactly one of tier, layer_tiers, widths"):
        load_model(target, tier=1, layer_tiers=[1, 1])
    args = ["generate", str(target), "--prompt", "def main(", "--max-new-tokens", "8",
            "--temperature", "0"]
    assert main([*args, "--widths", "64,128"]) == 0
    by_widths = capsys.readouterr()
    assert main([*args, "--layer-tiers", "2,1"]) == 0
    out, err = capsys.readouterr()
    assert out == by_widths.out and "mix[64,128]" in err
    assert main([*args, "--layer-tiers", "2,1", "--draft-layer-tiers", "3,3"]) == 0
    out, err = capsys.readouterr()
    assert out == by_widths.out and "draft tier 3 (width 32)" in err
    assert main([*args, "--layer-tiers", "2,1,0"]) == 2
    assert "3 per-layer tiers for a model of 2 layers" in capsys.readouterr().err
