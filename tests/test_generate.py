"""Generation at any width and speculative decoding inside one model (matformer.generate)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import distinct_widths_model

from matformer import MatFormerLM
from matformer.errors import ConfigError, DataError, TierError
from matformer.generation import Sampler, generate, generate_batch
from matformer.speculative import speculative_generate

pytestmark = pytest.mark.usefixtures("one_thread")


_model = distinct_widths_model


PROMPT = [5, 17, 300, 42, 8, 99, 123]


def test_cached_decoding_equals_uncached() -> None:
    model = _model()
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
    model = _model()
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
    model = _model(1)
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
    model = _model(2)
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
    model = _model(3)
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
    model = _model(4)
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
    model = _model(0, vocab_size=V, eos_token_id=None)
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
    model = _model()
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
