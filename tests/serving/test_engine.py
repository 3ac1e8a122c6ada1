"""The scheduler's parts without HTTP: the per-row decoding step against the model's own
forward, chunked prefill, rows joining and leaving between steps, and the auto policy."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from matformer.inference.decode import generate
from matformer.inference.sampling import Sampler
from matformer.serving.catalog import Catalog
from matformer.serving.engine import (
    PREFILL_KEY,
    Engine,
    EngineBusy,
    EngineClosed,
    Event,
    Job,
)
from matformer.serving.metrics import Metrics
from matformer.serving.policy import CostTable, LoadPolicy
from matformer.serving.rows import RowStepper
from matformer.tiers import Setting, TierError
from tests.conftest import tiny_lm


@pytest.fixture(scope="module")
def model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_lm(0, distinct=True, heads=True)
    torch.set_num_threads(n)


def test_a_step_of_rows_at_their_own_positions_is_the_models_forward(model) -> None:
    stepper = RowStepper(model)
    setting = Setting([128, 256], [2, 4])  # tier 1 FFN in layer 0, half the heads there
    torch.manual_seed(1)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 9, 2)]
    caches = [stepper.new_cache(setting, 16) for _ in prompts]
    assert [c.k[0].shape[1] for c in caches] == [2, 2, 2]  # each row's cache at its heads
    for cache, p in zip(caches, prompts, strict=True):
        stepper.prefill(setting, cache, p)
    nxt = [7, 8, 9]
    got = stepper.step(setting, caches, nxt)
    with torch.inference_mode(), model.running(setting):
        for b, (p, t) in enumerate(zip(prompts, nxt, strict=True)):
            want = model(torch.tensor([p + [t]]))[0, -1]
            assert torch.allclose(got[b], want, atol=1e-5, rtol=1e-5)
            alone = stepper.new_cache(setting, 16)
            stepper.prefill(setting, alone, p)
            # one row alone: the model's own cached step, bit for bit
            own = model(torch.tensor([[t]]), cache=_cache_of(model, setting, p))[0, -1]
            assert torch.equal(stepper.step(setting, [alone], [t])[0], own)
    assert [c.length for c in caches] == [6, 10, 3]


@pytest.mark.parametrize("batched", [True, False])
def test_rows_in_scattered_slots_of_a_grown_pool_step_as_the_model(model, batched) -> None:
    """Rows whose slots are not consecutive (a gather, not a view) and a pool that grew while
    rows held keys; unbatched: the model's own per-row step (what a model with q/k norms,
    biases or a window takes), on the same slots."""
    torch.manual_seed(3)
    stepper = RowStepper(model)
    assert stepper.batched
    stepper.batched = batched
    full = Setting(model.stored_widths, model.stored_kv_heads)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (4, 7, 3)]
    caches = [stepper.new_cache(full, 8) for _ in prompts]
    for cache, p in zip(caches, prompts, strict=True):
        stepper.prefill(full, cache, p)
    stepper.release(caches[1])  # slot 1 free; the next cache takes it and grows capacity
    bigger = stepper.new_cache(full, 40)
    assert bigger.slot == caches[1].slot and stepper.pool.capacity >= 40
    rows = [caches[2], caches[0]]  # slots 2, 0: scattered
    got = stepper.step(full, rows, [11, 12])
    with torch.inference_mode(), model.running(full):
        for b, (p, t) in enumerate(zip([prompts[2], prompts[0]], [11, 12], strict=True)):
            want = model(torch.tensor([p + [t]]))[0, -1]
            assert torch.allclose(got[b], want, atol=1e-5, rtol=1e-5)


def _cache_of(model, setting, prompt):
    cache = model.new_cache(1, 16, kv_heads=setting.kv_heads)
    with model.running(setting):
        model(torch.tensor([prompt]), cache=cache)
    return cache


def test_a_prompt_prefilled_in_chunks_gives_the_same_logits(model) -> None:
    stepper = RowStepper(model)
    full = Setting(model.stored_widths, model.stored_kv_heads)
    prompt = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    one = stepper.prefill(full, stepper.new_cache(full, 48), prompt)
    cache = stepper.new_cache(full, 48)
    for i in range(0, 40, 16):
        chunked = stepper.prefill(full, cache, prompt[i:i + 16])
    assert torch.allclose(chunked, one, atol=1e-5, rtol=1e-5)


def _job(engine: Engine, prompt: list[int], n: int, width, events: list) -> Job:
    return Job(prompt, n, Sampler(), set(), width, events.append)


def test_jobs_join_and_leave_between_steps_and_long_prompts_are_chunked(model) -> None:
    catalog = Catalog("m", model)
    engine = Engine(model, catalog, Metrics(), max_batch=2, prefill_chunk=8)
    ev_a: list[Event] = []
    ev_b: list[Event] = []
    ev_c: list[Event] = []
    a = _job(engine, [5, 6, 7], 6, catalog.parse("tier-2"), ev_a)
    long_prompt = list(range(10, 30))  # 20 tokens: 3 chunks of 8
    b = _job(engine, long_prompt, 8, catalog.full(), ev_b)
    c = _job(engine, [9, 9], 2, catalog.full(), ev_c)
    for job in (a, b, c):
        engine.submit(job)
    engine.admit()
    assert engine.running == [a, b] and list(engine.waiting) == [c]  # max_batch 2
    engine.step()  # a: prefill (first token)
    assert len(a.tokens) == 1 and b.fed == 0
    for k in range(3):  # b's three chunks: a decodes one token in each of these steps
        engine.step()
        assert len(a.tokens) == 2 + k and b.fed == min(8 * (k + 1), 20)
    assert len(b.tokens) == 1  # its first token came with its last chunk
    while not a.finished:
        engine.step()
    engine.running = [j for j in engine.running if not j.finished]
    engine.admit()  # a left: c joins the running batch
    assert engine.running == [b, c]
    while engine.running:
        engine.step()
        engine.running = [j for j in engine.running if not j.finished]
    for job, events, width in ((a, ev_a, {"tier": 2}), (b, ev_b, {}), (c, ev_c, {})):
        assert [e.token for e in events if e.kind == "token"] == job.tokens
        assert events[-1].kind == "done" and events[-1].reason == "length"
        want = generate(model, job.prompt, job.max_tokens, ignore_eos=True, **width).tokens
        assert job.tokens == want


def test_a_cancelled_job_leaves_at_the_next_step(model) -> None:
    catalog = Catalog("m", model)
    engine = Engine(model, catalog, Metrics(), max_batch=4)
    events: list[Event] = []
    job = _job(engine, [5, 6], 50, catalog.full(), events)
    engine.submit(job)
    engine.admit()
    engine.step()
    engine.step()
    job.cancel()
    engine.step()
    assert job.finished and job.cache is None and len(job.tokens) == 2


def test_the_policy_takes_the_widest_width_under_the_target() -> None:
    table = CostTable()
    for key, cost in (("wide", 0.010), ("mid", 0.006), ("narrow", 0.004)):
        table.observe(key, 1, cost)
        table.observe(key, 4, 3 * cost)
    policy = LoadPolicy(["wide", "mid", "narrow"], 0.0125, table)
    assert policy.choose(1, 0.0) == "wide"
    assert policy.choose(1, 0.004) == "mid"  # other work in the step leaves less room
    assert policy.choose(4, 0.0) == "narrow"
    assert policy.choose(2, 0.0) == "mid"  # 2 rows: interpolated, 0.016 / 0.0096
    assert policy.choose(8, 0.0) == "narrow"  # nothing fits: the narrowest
    assert LoadPolicy(["wide", "narrow"], None, table).choose(8, 1.0) == "wide"  # no target
    for _ in range(30):  # steps took 2x their estimate (scheduler, HTTP): the estimates scale
        policy.observe_interval(0.005, 0.010)
    assert 1.9 < policy.overhead <= 2.0
    assert policy.choose(1, 0.0) == "mid"  # 0.010 x 2 misses the target, 0.006 x 2 fits
    assert policy.choose(1, 0.001) == "narrow"  # 0.007 x 2 misses, 0.005 x 2 fits
    for i in range(64):  # 1 step in 5 took 1.5x its estimate: the slow ones set the scale
        policy.observe_interval(0.005, 0.0075 if i % 5 == 0 else 0.005)
    assert policy.overhead == 1.5
    assert policy.choose(1, 0.0) == "mid"  # 0.010 x 1.5 misses (the mean, 1.1x, would fit)
    table.observe("wide", 1, 0.001)  # measurements move the average
    assert 0.001 < table.estimate("wide", 1) < 0.010


def test_the_catalog_names_and_refuses_widths(model) -> None:
    catalog = Catalog("m", model)
    assert catalog.resolve("m").setting == Setting([256, 256], [4, 4])
    assert catalog.resolve("m@tier-1").setting.widths == [128, 128]
    assert catalog.resolve("m", [64, 128]).name == "m@widths=64,128"
    assert catalog.resolve("m@auto").auto
    assert catalog.resolve("m@tier-0").name == "m"
    with pytest.raises(LookupError):
        catalog.resolve("n@tier-1")
    for bad in ("m@tier-x", "m@tier-9", "m@widths=512,1", "m@color=red"):
        with pytest.raises(TierError):
            catalog.resolve(bad)
    with pytest.raises(TierError):
        catalog.resolve("m@tier-1", "tier-2")


def test_a_failing_width_group_fails_its_jobs_only(model, monkeypatch) -> None:
    catalog = Catalog("m", model)
    engine = Engine(model, catalog, Metrics(), max_batch=4)
    bad, good = catalog.parse("tier-2"), catalog.full()
    real = engine.stepper.step

    def step(setting, caches, tokens):
        if setting == bad.setting:
            raise RuntimeError("boom")
        return real(setting, caches, tokens)

    monkeypatch.setattr(engine.stepper, "step", step)
    ev_bad: list[Event] = []
    ev_good: list[Event] = []
    jobs = [_job(engine, [5, 6], 4, bad, ev_bad), _job(engine, [5, 6], 4, good, ev_good)]
    for job in jobs:
        engine.submit(job)
    engine.admit()
    for _ in range(6):
        engine.step()
    assert ev_bad[-1].kind == "error" and "RuntimeError" in ev_bad[-1].message
    assert ev_good[-1].kind == "done" and len(jobs[1].tokens) == 4


def test_a_full_queue_and_a_closed_engine_refuse_new_jobs(model) -> None:
    catalog = Catalog("m", model)
    engine = Engine(model, catalog, Metrics(), max_batch=1, max_waiting=1)
    engine.submit(_job(engine, [5], 2, catalog.full(), []))
    with pytest.raises(EngineBusy):
        engine.submit(_job(engine, [5], 2, catalog.full(), []))
    events: list[Event] = []
    engine.waiting[0].emit = events.append
    engine.stop()
    assert events[-1].kind == "error"  # what was waiting ends with an error, not silence
    with pytest.raises(EngineClosed):
        engine.submit(_job(engine, [5], 2, catalog.full(), []))


def test_under_a_target_the_narrowest_widths_cost_caps_the_batch() -> None:
    table = CostTable()
    for key, cost in (("wide", 0.004), ("narrow", 0.002)):
        table.observe(key, 1, cost)
        table.observe(key, 4, 4 * cost)
    policy = LoadPolicy(["wide", "narrow"], 0.005, table)
    assert policy.max_rows(8) == 2  # narrow: 0.002, 0.004 (interpolated), 0.006 misses
    assert policy.max_rows(8, pinned_seconds=0.002) == 1  # pinned work leaves room for one
    assert policy.max_rows(1) == 1
    assert policy.max_rows(8, per_row=0.001) == 1  # 2 rows: 0.004 + 2 x 0.001 misses
    assert LoadPolicy(["wide", "narrow"], None, table).max_rows(8) == 8  # no target: no cap
    assert LoadPolicy(["wide", "new"], 0.005, table).max_rows(8) == 8  # not measured yet


def test_an_engine_with_a_target_admits_what_the_narrowest_width_keeps_under_it(model) -> None:
    catalog = Catalog("m", model)
    engine = Engine(model, catalog, Metrics(), max_batch=4, slo_ms=5.0)
    for key in engine.auto_widths:  # measured costs: one row 2 ms, four rows 8 ms everywhere
        engine.table.observe(key, 1, 0.002)
        engine.table.observe(key, 4, 0.008)
    jobs = [Job([1, 2], 2, Sampler(), set(), catalog.resolve("m@auto"), lambda e: None)
            for _ in range(4)]
    for job in jobs:
        engine.submit(job)
    engine.admit()
    assert engine.running == jobs[:2] and list(engine.waiting) == jobs[2:]
    # a 2 ms prompt chunk per 2-token job adds 1 ms a row: two rows would take 6 ms
    engine.table.observe(PREFILL_KEY, 1, 0.002)
    engine.running, engine.waiting = [], deque(jobs)
    engine.admit()
    assert engine.running == jobs[:1]


def test_a_prompt_read_with_no_auto_row_decoding_gets_the_width_it_would_decode_at(model) -> None:
    """A target that no width meets with a prompt chunk in the step (a 10 ms chunk, 5 ms
    target) but the full width meets decoding alone: the prompt is read at the full width (its
    chunk is its own wait for the first token), not at the narrowest."""
    catalog = Catalog("m", model)
    engine = Engine(model, catalog, Metrics(), max_batch=4, slo_ms=5.0)
    for key, width in engine.auto_widths.items():
        full = width.setting == catalog.full().setting
        engine.table.observe(key, 1, 0.004 if full else 0.002)
    engine.table.observe(PREFILL_KEY, 1, 0.010)
    events: list[Event] = []
    job = Job([1, 2, 3], 2, Sampler(), set(), catalog.resolve("m@auto"), events.append)
    engine.submit(job)
    engine.admit()
    engine.step()
    assert events[0].kind == "token" and events[0].width == catalog.full().name
