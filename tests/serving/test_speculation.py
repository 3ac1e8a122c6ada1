"""Speculative decoding in `matformer serve`: a lone greedy request decoded as draft/verify
rounds with a narrower tier of the same weights gives exactly `matformer generate`'s text.

The real server (uvicorn in a thread, a free loopback port) is driven by the official `openai`
client, with rounds forced (`--speculative always`) or switched off on the same server; the
references are `matformer.generate` on a second copy of the checkpoint. The model is conftest's
tiny_lm at random init (not `distinct`): its widths agree often but not always, so rounds both
accept and reject drafts. `auto`'s choice is tested on given costs and observations (no timing
is asserted).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from matformer.inference.decode import generate
from matformer.inference.sampling import Sampler
from matformer.inference.speculative import DecodeCosts, DraftRound, rechoose_draft
from matformer.io.checkpoint import load_model
from matformer.serving.catalog import Catalog
from matformer.serving.engine import Engine, Event, Job
from matformer.serving.metrics import Metrics
from matformer.serving.server import ServerThread, load_state
from matformer.serving.speculation import (
    KS,
    RECHOOSE_EVERY,
    REPROBE_EVERY,
    Speculator,
    TargetState,
)
from tests.conftest import tiny_lm
from tests.serving.conftest import one_torch_thread, write_checkpoint

NAME = "spec"
PROMPT = "the quick brown fox"
WIDTHS = [(NAME, {}), (f"{NAME}@tier-1", {"tier": 1}), (f"{NAME}@tier-2", {"tier": 2}),
          (f"{NAME}@widths=64,256", {"widths": [64, 256]}),
          (f"{NAME}@tier-1,kv_heads=2", {"tier": 1, "kv_heads": 2})]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, tokenizer, reference model)."""
    with one_torch_thread():
        folder = tmp_path_factory.mktemp("spec") / NAME
        tok = write_checkpoint(folder, 200, heads=True, max_position_embeddings=512)
        state = load_state(folder, max_batch=4, speculative="always")
        ref = load_model(folder).eval()
        with ServerThread(state) as server:
            yield server, tok, ref


def reference(served, prompt: str, n: int, **width) -> str:
    _, tok, ref = served
    out = generate(ref, tok.encode(prompt).ids, n, **width)
    return tok.decode(out.tokens, skip_special_tokens=True)


def counter(url: str, name: str) -> float:
    """A `/metrics` counter summed over its labels."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"matformer_{name}"))


def test_speculative_and_plain_give_generates_greedy_text_at_every_width(served, client) -> None:
    engine = served[0].state.engine
    url = served[0].url
    try:
        for model, width in WIDTHS:
            want = reference(served, PROMPT, 24, **width)
            got = {}
            for mode in ("always", "off"):
                engine.speculator.mode = mode
                before = counter(url, "speculative_drafted_tokens_total")
                r = client.completions.create(model=model, prompt=PROMPT, max_tokens=24,
                                              temperature=0)
                spec = r.usage.model_extra["speculative"]
                drafted = counter(url, "speculative_drafted_tokens_total") - before
                assert drafted == spec["drafted"]
                assert (spec["drafted"] > 0) == (mode == "always"), (model, mode)
                assert 0 <= spec["accepted"] <= spec["drafted"]
                assert sum(r.usage.model_extra["widths"].values()) == r.usage.completion_tokens
                got[mode] = r.choices[0].text
            assert got["always"] == got["off"] == want, model
    finally:
        engine.speculator.mode = "always"
    assert counter(url, "speculative_accepted_tokens_total") > 0  # rounds keep drafts
    text = httpx.get(url + "/metrics", timeout=10).text
    assert f'matformer_speculative_rounds_total{{width="{NAME}@tier-1"}}' in text


def test_a_streamed_speculative_request_sends_every_token_once(served, client) -> None:
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference(served, PROMPT,
                                                                                 20)
    assert chunks[-1].usage.model_extra["speculative"]["drafted"] > 0


def test_concurrent_requests_with_speculation_each_equal_their_single_output(served,
                                                                              client) -> None:
    """Rows batched together take plain steps; the last one left alone drafts again."""
    prompts = [PROMPT, "jumps over the lazy", "dog 14", "the", "fox 3 jumps"]
    jobs = [(p, WIDTHS[i % len(WIDTHS)], 8 + 6 * i) for i, p in enumerate(prompts)]
    start = threading.Barrier(len(jobs))

    def one(job):
        prompt, (model, _), n = job
        start.wait(10)
        return client.completions.create(model=model, prompt=prompt, max_tokens=n,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    for (prompt, (_, width), n), text in zip(jobs, got, strict=True):
        assert text == reference(served, prompt, n, **width)


def test_sampled_requests_are_not_speculated(served, client) -> None:
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0.8,
                                  seed=3)
    assert r.usage.model_extra["speculative"] == {"drafted": 0, "accepted": 0}


# ---- auto's choice and the engine's fallbacks, without HTTP --------------------------------


@pytest.fixture(scope="module")
def model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_lm(0, heads=True)
    torch.set_num_threads(n)


def _given(spec: Speculator, catalog: Catalog, *, draft: float, verify: float,
           acceptance: float) -> TargetState:
    """`spec`'s state at the full width from given costs (a plain step: 1 s) and a prior."""
    target = catalog.full().setting
    drafts = spec.drafts(target)
    costs = DecodeCosts(1.0, {d.name: draft for d in drafts}, dict.fromkeys(KS, verify),
                        plain_step=1.0)
    state = TargetState(drafts, costs, DraftRound(drafts[0], 0, "auto",
                                                  dict.fromkeys([d.name for d in drafts],
                                                                acceptance), plain_ok=True))
    spec.states[(tuple(target.widths), tuple(target.kv_heads))] = state
    rechoose_draft(state.round, drafts, costs, KS, state.extra)  # the first choice
    return state


def test_auto_drafts_when_it_pays_and_stops_when_rounds_run_slow(model) -> None:
    catalog = Catalog("m", model)
    target = catalog.full().setting
    spec = Speculator(Engine(model, catalog, Metrics()).stepper, catalog, "auto")
    _given(spec, catalog, draft=0.1, verify=1.1, acceptance=0.9)
    plan = spec.plan(target, [5, 6], 2)
    assert plan is not None and plan.k > 1, spec.describe(target)  # cheap, agreeing drafts
    for _ in range(20):  # its rounds take 10x what the costs predicted: plain steps win
        spec.observe_round(target, plan, plan.k, plan.k,
                           10 * (plan.k * 0.1 + 1.1))
    assert spec.plan(target, [5, 6], 2) is None, spec.describe(target)


def test_auto_keeps_plain_steps_and_probes_a_draft_only_when_it_could_pay(model) -> None:
    catalog = Catalog("m", model)
    target = catalog.full().setting
    stepper = Engine(model, catalog, Metrics()).stepper
    spec = Speculator(stepper, catalog, "auto")
    _given(spec, catalog, draft=0.5, verify=2.0, acceptance=0.5)  # pays only if accepted
    plans = [spec.plan(target, [5, 6], 2) for _ in range(3 * REPROBE_EVERY)]
    probes = [p for p in plans if p is not None]
    assert len(probes) == 3 and all(p.probe for p in probes)  # one round per REPROBE_EVERY
    spec = Speculator(stepper, catalog, "auto")
    _given(spec, catalog, draft=1.0, verify=3.0, acceptance=1.0)  # never pays, even accepted
    assert all(spec.plan(target, [5, 6], 2) is None for _ in range(2 * REPROBE_EVERY))


def test_a_failing_round_falls_back_to_plain_steps_for_the_same_tokens(model,
                                                                      monkeypatch) -> None:
    catalog = Catalog("m", model)
    engine = Engine(model, catalog, Metrics(), speculative="always")
    width = catalog.parse("tier-1")

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.stepper, "forward_all", boom)
    events: list[Event] = []
    job = Job([5, 6, 7], 10, Sampler(), set(), width, events.append)
    engine.submit(job)
    engine.admit()
    while engine.running:
        engine.step()
        engine.running = [j for j in engine.running if not j.finished]
    assert events[-1].kind == "done" and job.drafted == 0
    assert job.tokens == generate(model, job.prompt, 10, ignore_eos=True, tier=1).tokens
    assert engine.speculator.disabled  # no more rounds at that width


def test_plain_steps_measured_slower_than_timed_make_a_draft_pay(model) -> None:
    catalog = Catalog("m", model)
    target = catalog.full().setting
    spec = Speculator(Engine(model, catalog, Metrics()).stepper, catalog, "auto")
    state = _given(spec, catalog, draft=0.3, verify=1.8, acceptance=0.7)  # 1 s a token: plain
    state.round.seen = {d.name: [11.2, 16] for d in state.drafts}  # observed enough: no exploring
    rechoose_draft(state.round, state.drafts, state.costs, KS, state.extra)
    assert spec.plan(target, [5, 6], 2) is None, spec.describe(target)
    for _ in range(RECHOOSE_EVERY):  # plain tokens as served take 3 s: drafting now pays
        spec.observe_plain(target, 3.0)
    plan = spec.plan(target, [5, 6], 2)
    assert plan is not None and not plan.probe, spec.describe(target)


def test_costs_timed_at_start_serve_the_first_lone_request(model) -> None:
    catalog = Catalog("m", model)
    full = catalog.full().setting
    spec = Engine(model, catalog, Metrics(), speculative="auto").speculator
    costs = spec.prepare(full)
    assert costs is not None and set(costs.verify) == set(KS)
    assert set(costs.draft_steps) == {d.name for d in spec.drafts(full)}
    spec.plan(full, [5, 6, 7], 3)
    assert spec.states[(tuple(full.widths), tuple(full.kv_heads))].costs is costs
    assert Speculator(spec.stepper, catalog, "off").prepare(full) is None
