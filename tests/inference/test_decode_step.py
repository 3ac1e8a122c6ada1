"""`decode_step`: a whole one-token step as one C++ call (inference/decode_step.py, .cpp).

Checked against the eager static-cache step of the same model, token by token over a greedy
continuation: every family on the Llama block (q/k/v/o biases, Qwen3's q/k norms, sliding
windows, rope scaling, tied embeddings, a tanh GELU), narrower FFN widths and KV heads, the
three dtypes; a greedy speculative round as one call (`decode_round`) against its draft steps
and verify run apart. Also: that a compiled decoder runs its one-token steps through it and compiles
nothing for them, that what it does not cover falls back to the compiled step, and the switch
that turns it off."""

from __future__ import annotations

import pytest
import torch

import matformer.models.registry  # noqa: F401  (the families' configs)
from matformer.inference import decode_step, row_kernel
from matformer.inference.compile_cache import compile_stats
from matformer.inference.decode import generate
from matformer.inference.speculative import greedy_accept, speculative_generate
from matformer.inference.static_cache import StaticDecoder
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import MatFormerLM
from matformer.tiers import WidthRequest
from tests.conftest import random_norms_and_biases, tiny_lm

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama3-tied": dict(model_type="llama", tie_word_embeddings=True, rope_parameters=LLAMA3),
    "llama-bias-linear": dict(model_type="llama", attention_bias=True, rope_parameters={
        "rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}),
    "mistral-window": dict(model_type="mistral", sliding_window=5),
    "qwen2-window": dict(model_type="qwen2", use_sliding_window=True, sliding_window=6,
                         max_window_layers=1),
    "qwen3-norms-bias": dict(model_type="qwen3", attention_bias=True),
    "gelu-tanh": dict(model_type="llama", hidden_act="gelu_pytorch_tanh"),
    # no size a multiple of a vector: every loop's scalar tail
    "odd-sizes": dict(model_type="llama", hidden_size=40, intermediate_size=72, head_dim=10),
}
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}
"""Largest logit difference allowed against the eager step (logits of size 1-4): float32 sums
in another order; in half precision one rounding of an activation may land the other way."""


@pytest.fixture(autouse=True)
def _kernels(one_thread):
    if not row_kernel.wanted() or not row_kernel.available():
        pytest.skip("the CPU kernels do not build here (no C++ compiler, or no AVX2/AVX-512)")


def _family(name: str, seed: int = 0) -> MatFormerLM:
    cfg = MatFormerConfig.from_dict({**BASE, **FAMILIES[name]})
    torch.manual_seed(seed)
    model = MatFormerLM(cfg).eval()
    random_norms_and_biases(model)
    with torch.no_grad():  # visibly non-linear FFNs and peaked attention
        for n, p in model.named_parameters():
            if n.endswith("proj.weight"):
                p.mul_(8.0)
    return model


def _compare(model: MatFormerLM, steps: int = 20, prompt: int = 5) -> float:
    """The largest logit difference over a greedy continuation decoded by the eager static step
    and by a compiled decoder's one-token steps (asserted to be the C++ step's), fed the same
    tokens."""
    ref = StaticDecoder(model, 1, 64)
    fast = StaticDecoder(model, 1, 64, compile=True)
    assert fast.native and fast._plan() is not None, decode_step.why_not(model, fast.cache)
    ids = torch.arange(3, 3 + prompt)
    ref.prefill([ids])
    fast.prefill([ids])
    tok, worst = torch.tensor([[7]]), 0.0
    for _ in range(steps):
        a, b = ref.step(tok), fast.step(tok)
        assert b.shape == a.shape and b.dtype == a.dtype
        worst = max(worst, (a.float() - b.float()).abs().max().item())
        tok = a.argmax(-1).view(1, 1)
    return worst


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_matches_the_eager_step(name):
    # 20 steps after a 5-token prompt: past every window (5, 6) and the llama3 rope's 16
    worst = _compare(_family(name))
    assert worst < TOL[torch.float32], (name, worst)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("setting", [dict(), dict(tier=2), dict(tier=1, kv_heads=2)])
def test_widths_heads_and_dtypes_match_the_eager_step(dtype, setting):
    model = tiny_lm(0, distinct=True, heads=True, random_norms=True).to(dtype)
    model.set_widths(**setting)
    worst = _compare(model, steps=12)
    assert worst < TOL[dtype], (dtype, setting, worst)


def test_verifies_of_several_tokens_match_the_eager_forward():
    model = tiny_lm(0, distinct=True, heads=True, random_norms=True)
    for setting in (dict(), dict(tier=3, kv_heads=1)):
        model.set_widths(**setting)
        ref = StaticDecoder(model, 1, 64)
        fast = StaticDecoder(model, 1, 64, compile=True)
        for dec in (ref, fast):
            dec.prefill([torch.arange(3, 9)])
        for block in ([[4, 9, 2]], [[1]], [[5, 6, 7, 8, 9, 10, 11, 12]], [[2, 3]]):
            ids = torch.tensor(block)
            a, b = ref.forward(ids), fast.forward(ids)
            assert b.shape == a.shape == (1, len(block[0]), model.config.vocab_size)
            assert (a - b).abs().max().item() < TOL[torch.float32], setting
            ref.crop(ref.pos - 1)  # as a rejected draft: the next block overwrites a column
            fast.crop(fast.pos - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_verifies_over_long_weight_rows_match_the_eager_forward(dtype):
    # FFN rows of 1100 (a tail past the last vector): from 4 tokens on the down projection's
    # inputs outgrow the L1 cache and its product is tiled over weight rows; a hidden size of
    # 42 leaves weight rows over after the tiles of 5 and 4 weight rows (5 and 6 tokens)
    cfg = MatFormerConfig.from_dict({**BASE, "model_type": "llama", "hidden_size": 42,
                                     "intermediate_size": 1100, "head_dim": 10})
    torch.manual_seed(1)
    model = MatFormerLM(cfg).eval().to(dtype)
    ref = StaticDecoder(model, 1, 64)
    fast = StaticDecoder(model, 1, 64, compile=True)
    for dec in (ref, fast):
        dec.prefill([torch.arange(3, 9)])
    for n in range(2, 9):
        ids = torch.arange(10, 10 + n)[None]
        a, b = ref.forward(ids), fast.forward(ids)
        assert (a.float() - b.float()).abs().max().item() < TOL[dtype], n
        ref.crop(ref.pos - n)
        fast.crop(fast.pos - n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_greedy_round_is_its_draft_steps_and_verify(dtype):
    # one call for k drafts at a narrower setting (fewer KV heads too) and the verify at the
    # target's: the drafts, the target's argmax and the cache bit for bit as the steps and the
    # verify run one call each
    model = tiny_lm(0, distinct=True, heads=True, random_norms=True).to(dtype)
    target = model.resolve(WidthRequest())
    draft = model.resolve(WidthRequest(tier=3, kv_heads=1))
    one, apart = (StaticDecoder(model, 1, 64, compile=True) for _ in range(2))
    for dec in (one, apart):
        dec.prefill([torch.arange(3, 9)])
    tok, accepted = 7, 0
    for k in (1, 2, 4, 7, 3, 2):
        start = apart.pos
        model.apply(draft)
        drafts, t = [], tok
        for _ in range(k):
            t = int(apart.step(torch.tensor([[t]]))[0].argmax())
            drafts.append(t)
        apart.crop(start)
        model.apply(target)
        best = apart.forward(torch.tensor([[tok, *drafts]]))[0].argmax(-1).tolist()
        model.apply(draft)  # the round applies both settings itself
        assert one.greedy_round(draft, target, tok, k) == (drafts, best), k
        assert one.pos == apart.pos == start + k + 1 and model.widths == target.widths
        n, new = greedy_accept(drafts, best)
        accepted += n
        for dec in (one, apart):
            dec.crop(start + 1 + n)
        for a, b in zip((*one.cache.k, *one.cache.v), (*apart.cache.k, *apart.cache.v),
                        strict=True):
            assert torch.equal(a[..., :one.pos, :], b[..., :one.pos, :])
        tok = new[-1]
    assert one.greedy_round(draft, target, tok, decode_step.MAX_ROWS) is None  # k + 1 > 8 rows


def test_speculative_decoding_runs_each_greedy_round_as_one_call(monkeypatch):
    calls = []
    real = decode_step.greedy_round
    monkeypatch.setattr(decode_step, "greedy_round", lambda *a: calls.append(a[3]) or real(*a))
    model = tiny_lm(0, distinct=True, heads=True, random_norms=True)
    plain = generate(model, [3, 4, 5, 6], 24, ignore_eos=True)
    before = compile_stats()
    spec = speculative_generate(model, [3, 4, 5, 6], 24, ignore_eos=True, compile=True,
                                draft_tier=2, draft_tokens=3, draft_kv_heads=2)
    ran = compile_stats().since(before)
    assert spec.tokens == plain.tokens and ran.graphs == 0
    rounds = spec.stats.target_forwards - 1  # the prompt's forward, then a verify a round
    assert ran.native_calls == rounds + spec.stats.draft_forwards
    # one call a round; the last may have had room for no draft (then a one-token verify)
    assert rounds - 1 <= len(calls) <= rounds and set(calls[:-1]) == {3}
    # sampling: drafts and the verify call by call (a draw between them), the same C++ step
    calls.clear()
    before = compile_stats()
    speculative_generate(model, [3, 4, 5, 6], 24, ignore_eos=True, compile=True, draft_tier=2,
                         draft_tokens=3, temperature=0.8, seed=1)
    assert compile_stats().since(before).native_calls > 0 and calls == []


def test_a_narrower_setting_sees_weights_changed_in_place():
    # its plan holds the down and output projections' column slices as copies: a weight
    # changed in place after the plan was made (an optimizer step, load_state_dict) is read again
    model = tiny_lm(0, distinct=True, heads=True)
    model.set_widths(tier=2, kv_heads=2)
    ref = StaticDecoder(model, 1, 32)
    fast = StaticDecoder(model, 1, 32, compile=True)
    for dec in (ref, fast):
        dec.prefill([torch.arange(3, 8)])
    tok = torch.tensor([[4]])
    assert (ref.step(tok) - fast.step(tok)).abs().max().item() < TOL[torch.float32]
    plan = fast._plan()
    assert plan is not None and len(plan.copied) == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
            layer.self_attn.o_proj.weight.add_(0.5)
    a, b = ref.step(tok), fast.step(tok)
    assert (a - b).abs().max().item() < TOL[torch.float32] and fast._plan() is not plan


def test_a_decoder_keeps_its_last_few_plans():
    from matformer.inference.static_cache import PLANS_KEPT

    model = tiny_lm(0, distinct=True, heads=True)
    ref = StaticDecoder(model, 1, 64)
    fast = StaticDecoder(model, 1, 64, compile=True)
    for dec in (ref, fast):
        dec.prefill([torch.arange(3, 8)])
    settings = [dict(tier=t, kv_heads=g) for t in (0, 1, 2, 3) for g in (4, 2)]
    tok = torch.tensor([[4]])
    for setting in settings + settings[:2]:
        model.set_widths(**setting)
        a, b = ref.step(tok), fast.step(tok)
        assert (a - b).abs().max().item() < TOL[torch.float32], setting
        assert len(fast._plans) <= PLANS_KEPT


def test_one_token_steps_and_verifies_compile_nothing():
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = tiny_lm(0)
    dec = StaticDecoder(model, 1, 32, compile=True, backend=counting)
    dec.prefill([torch.arange(4)])
    before = compile_stats()
    for _ in range(5):
        dec.step(torch.tensor([[1]]))
    dec.forward(torch.tensor([[1, 2, 3]]))  # a verify of 3 tokens
    assert graphs == [] and dec.pos == 12
    ran = compile_stats().since(before)
    assert ran.native_calls == 6 and ran.graphs == 0
    assert ran.describe().startswith("nothing to compile (decoding steps ran as one C++ call")
    dec.forward(torch.arange(9)[None])  # more tokens than one call takes: the compiled graph
    assert len(graphs) == 1 and dec.pos == 21


def test_what_it_does_not_cover_runs_the_compiled_step(monkeypatch):
    model = tiny_lm(0)
    batch = StaticDecoder(model, 2, 32, compile=True, backend="eager")
    assert batch._plan() is None and "batch" in decode_step.why_not(model, batch.cache)
    batch.prefill([torch.arange(4), torch.arange(2)])
    assert batch.step(torch.tensor([[1], [2]])).shape == (2, model.config.vocab_size)

    from peft import LoraConfig, get_peft_model
    wrapped = get_peft_model(tiny_lm(0), LoraConfig(r=2, target_modules=["q_proj"])).base_model.model
    one = StaticDecoder(wrapped, 1, 32, compile=True, backend="eager")
    assert one._plan() is None and "wrapped" in decode_step.why_not(wrapped, one.cache)

    monkeypatch.setenv(decode_step.ENV, "0")
    assert not StaticDecoder(model, 1, 32, compile=True, backend="eager").native
