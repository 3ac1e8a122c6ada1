"""The continuous-batching scheduler: one thread owns the model and runs steps.

A request becomes a `Job` (prompt ids, limits, sampler, width) and waits in a queue. Before
every step the scheduler admits waiting jobs while the running batch has room (`max_batch`),
drops jobs whose client went away, and then runs one step:

- every running job that has its first token decodes one more: jobs are grouped by width
  setting and each group is one batched forward (`rows.RowStepper.step`); `auto` jobs join the
  group of the width `policy.LoadPolicy` chooses for this step;
- the oldest job still reading its prompt gets one chunk of it (`PREFILL_CHUNK` tokens), so a
  long prompt delays the running streams by one chunk per step, not by the whole prompt; its
  last chunk gives its first token and it decodes from the next step on;
- when the running batch is one greedy decoding job (latency-bound: nothing to batch with), its
  step may be a speculative round instead (`speculation.Speculator` decides, from costs and
  rounds measured here): k tokens drafted at a narrower tier in the job's own KV slot, then one
  forward of k+1 tokens at the job's width, the accepted prefix kept and the rest cropped.

Tokens go back to the request's handler through its `emit` callback (thread-safe: the handler
runs on the event loop). A job leaves the batch at its end-of-sequence token, at `max_tokens`,
or when cancelled; its KV cache goes with it. An exception in one group fails that group's jobs
with an error event and the loop goes on: other requests are unaffected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from matformer.inference.huge_pages import weights_on_huge_pages
from matformer.inference.sampling import Sampler
from matformer.inference.speculative import verify_drafts
from matformer.models.lm.model import MatFormerLM
from matformer.serving.catalog import Catalog, Width, setting_key
from matformer.serving.metrics import Metrics
from matformer.serving.policy import CostTable, LoadPolicy, calibration_sizes
from matformer.serving.rows import RowStepper, SlotCache
from matformer.serving.speculation import Plan, Speculator
from matformer.tiers import Setting

log = logging.getLogger("matformer.serve")

PREFILL_CHUNK = 64
"""Prompt tokens one step prefills (of one job)."""

PREFILL_KEY = ("prefill",)
"""The cost table's key for one prefill chunk."""


class EngineClosed(RuntimeError):
    """The engine is shutting down (or has stopped): no new jobs."""


class EngineBusy(RuntimeError):
    """The waiting queue is full."""


@dataclass
class Event:
    """What a job tells its handler: a `token` (with the width name that made it), `done`
    (with the finish reason: 'stop' or 'length'), or `error` (with a message)."""

    kind: str
    token: int = -1
    width: str = ""
    reason: str = ""
    message: str = ""


@dataclass
class Job:
    """One sequence to decode. `emit` is called from the engine thread."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    eos: set[int]
    width: Width
    emit: Callable[[Event], None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    cache: SlotCache | None = None
    fed: int = 0
    last: int | None = None
    tokens: list[int] = field(default_factory=list)
    widths_used: Counter = field(default_factory=Counter)
    first_at: float | None = None
    last_at: float = 0.0
    finished: bool = False
    drafted: int = 0
    accepted: int = 0
    """Draft tokens proposed for this job by speculative rounds, and accepted of them."""

    def cancel(self) -> None:
        """Ask the engine to drop this job before its next step (any thread)."""
        self.cancelled = True


class Engine:
    """The scheduler thread around one model."""

    def __init__(self, model: MatFormerLM, catalog: Catalog, metrics: Metrics, *,
                 max_batch: int = 8, slo_ms: float | None = None, compile: bool = False,
                 max_waiting: int = 256, prefill_chunk: int = PREFILL_CHUNK,
                 speculative: str = "auto") -> None:
        self.model = model
        if next(model.parameters()).device.type == "cpu":  # every step streams the weights
            weights_on_huge_pages(model)
        self.catalog = catalog
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.stepper = RowStepper(model, compile=compile)
        self.table = CostTable()
        self.speculator = Speculator(self.stepper, catalog, speculative)
        tiers = catalog.tier_widths()
        self.auto_widths: dict[Hashable, Width] = {setting_key(w.setting): w for w in tiers}
        self.policy = LoadPolicy(list(self.auto_widths), None if slo_ms is None
                                 else slo_ms / 1000.0, self.table)
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None
        metrics.gauges["queue_depth"] = lambda: len(self.waiting)
        metrics.gauges["running_requests"] = lambda: len(self.running)

    # ---- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Measure the auto candidates' step costs (with a target) and the full width's draft
        costs (`--speculative auto`), and start the thread."""
        if self.policy.slo_s is not None:
            self.calibrate()
        full = self.catalog.full().setting
        # The full width's draft costs, so a first lone request there does not wait for them;
        # with a target, every width `auto` may run (a request's wait is its latency).
        targets = [full]
        if self.policy.slo_s is not None:
            targets += [w.setting for w in self.auto_widths.values()
                        if w.setting is not None and setting_key(w.setting) != setting_key(full)]
        for target in targets:
            try:
                costs = self.speculator.prepare(target)
                if costs is not None:
                    log.info("speculative decoding costs timed in %.2f s", costs.seconds)
            except Exception:  # noqa: BLE001  (no speculation at that width, serving goes on)
                log.exception("timing speculative decoding failed; plain steps at that width")
                self.speculator.disable(target)
        self.thread = threading.Thread(target=self.loop, name="matformer-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, end the ones left with an error event, and stop the thread."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
        for job in [*self.waiting, *self.running]:
            self._fail(job, "the server is shutting down")
        self.waiting.clear()
        self.running.clear()

    def submit(self, job: Job) -> None:
        """Queue `job` (any thread); `EngineClosed` when stopping, `EngineBusy` when full."""
        with self.cond:
            if self.closed:
                raise EngineClosed("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise EngineBusy(f"{len(self.waiting)} requests are waiting; retry later")
            self.waiting.append(job)
            self.cond.notify()

    def calibrate(self, reps: int = 3) -> None:
        """Time each auto candidate at batch sizes 1, 2, 4, ... `max_batch` (and one prefill
        chunk) on throwaway caches, so the first auto steps have costs to choose from."""
        ctx = self.model.config.max_position_embeddings
        length = min(32, ctx - reps - 2)
        for key, width in self.auto_widths.items():
            assert width.setting is not None
            for b in calibration_sizes(self.max_batch):
                caches = [self.stepper.new_cache(width.setting, length + reps + 1)
                          for _ in range(b)]
                for c in caches:
                    c.length = length
                self.stepper.step(width.setting, caches, [0] * b)  # warm-up
                t0 = time.perf_counter()
                for _ in range(reps):
                    self.stepper.step(width.setting, caches, [0] * b)
                self.table.observe(key, b, (time.perf_counter() - t0) / reps)
                for c in caches:
                    self.stepper.release(c)
        full = self.catalog.full().setting
        n = min(self.prefill_chunk, ctx)
        cache = self.stepper.new_cache(full, n)
        t0 = time.perf_counter()
        self.stepper.prefill(full, cache, [0] * n)
        self.table.observe(PREFILL_KEY, 1, time.perf_counter() - t0)
        self.stepper.release(cache)

    # ---- the loop ------------------------------------------------------------------------

    def loop(self) -> None:
        previous: tuple[float, float] | None = None  # (start, estimate) of the step before
        while True:
            with self.cond:
                if not self.waiting and not self.running:
                    previous = None  # idle: the next interval is no step's
                while not self.closed and not self.waiting and not self.running:
                    self.cond.wait()
                if self.closed:
                    return
                self.admit()
            now = time.perf_counter()
            if previous is not None:
                # what a running row waited for its token, against what the costs predicted
                self.policy.observe_interval(previous[1], now - previous[0])
            try:
                previous = (now, self.step())
            except Exception:  # a bug in the loop itself: fail the batch, keep serving
                log.exception("scheduler step failed")
                for job in self.running:
                    self._fail(job, "internal error in the scheduler")
            self.running = [j for j in self.running if not j.finished]

    def admit(self) -> None:
        """Move waiting jobs into the running batch while it has room (call under `cond`):
        `max_batch` rows, fewer with a target that the narrowest width misses at that many
        (`LoadPolicy.max_rows`; rows pinned to a width count at their measured cost)."""
        room = self.max_batch
        if self.policy.slo_s is not None:
            pinned: Counter[Hashable] = Counter(setting_key(j.width.setting) for j in self.running
                                                if j.width.setting is not None)
            held = sum(pinned.values())
            jobs = [*self.running, *self.waiting]
            room = min(self.max_batch, held + self.policy.max_rows(
                max(self.max_batch - held, 1), self.policy.other_cost(list(pinned.items())),
                per_row=self._chunk_share(jobs)))
        while self.waiting and len(self.running) < room:
            self.running.append(self.waiting.popleft())

    def _chunk_share(self, jobs: list[Job]) -> float:
        """What each running row adds to every row's per-token latency through prompt chunks:
        a row that leaves is replaced by one whose prompt runs in the steps (one chunk each),
        so a row brings its prompt's chunks once per its new tokens (means over `jobs`)."""
        chunk = self.table.estimate(PREFILL_KEY, 1)
        if not jobs or chunk is None:
            return 0.0
        chunks = sum(-(-len(j.prompt) // self.prefill_chunk) for j in jobs) / len(jobs)
        tokens = sum(max(1, j.max_tokens) for j in jobs) / len(jobs)
        return chunk * chunks / tokens

    def step(self) -> float:
        """One step: every decoding job one token, and one prefill chunk. Returns the step's
        estimated cost (seconds; 0 when nothing was measured yet)."""
        t_step = time.perf_counter()
        for job in self.running:
            if job.cancelled and not job.finished:
                self._finish(job)
        live = [j for j in self.running if not j.finished]
        decoding = [j for j in live if j.last is not None]
        prefilling = next((j for j in live if j.last is None), None)
        groups: dict[Hashable, list[Job]] = {}
        settings: dict[Hashable, Setting] = {}
        auto_jobs = []
        for job in decoding:
            if job.width.setting is None:
                auto_jobs.append(job)
                continue
            key = setting_key(job.width.setting)
            groups.setdefault(key, []).append(job)
            settings[key] = job.width.setting
        other = self.policy.other_cost([(k, len(v)) for k, v in groups.items()])
        pinned = other
        if prefilling is not None:
            other += self.table.estimate(PREFILL_KEY, 1) or 0.0
        # With auto rows decoding, their width keeps the whole step (the chunk included) under
        # the target. Without, the width serves only the prompt being read, whose chunk's time
        # is its wait for the first token, not anyone's per-token latency: it is chosen as for
        # that request decoding alone (counting the chunk, which no width fits in a tight
        # target, read a real model's prompt at its narrowest width and poisoned its cache).
        auto_key = self.policy.choose(max(len(auto_jobs), 1), other if auto_jobs else pinned)
        auto_width = self.auto_widths[auto_key]
        if len(live) == 1 and decoding and live[0].sampler.greedy:
            # latency-bound: one row alone may decode speculatively
            job = live[0]
            width = job.width if job.width.setting is not None else auto_width
            if self._lone(job, width):
                self.metrics.observe("step_seconds", time.perf_counter() - t_step)
                return 0.0  # a round's time is no step's: the policy's interval skips it
        estimate = other + ((self.table.estimate(auto_key, len(auto_jobs)) or 0.0)
                            if auto_jobs else 0.0)
        if auto_jobs:
            groups.setdefault(auto_key, []).extend(auto_jobs)
            settings[auto_key] = auto_width.setting  # type: ignore[assignment]
        for key, jobs in groups.items():
            self._decode(key, settings[key], jobs)
        if prefilling is not None:
            self._prefill(prefilling, auto_width)
        if groups or prefilling is not None:
            self.metrics.observe("step_seconds", time.perf_counter() - t_step)
        return estimate

    def _lone(self, job: Job, width: Width) -> bool:
        """Decode the lone job `job` at `width`: a speculative round, or a plain step (timed
        for the speculator). False: neither ran (the caller steps as usual)."""
        setting = width.setting
        assert setting is not None and job.cache is not None
        if self.speculator.mode == "off" or job.max_tokens - len(job.tokens) < 2:
            return False  # no draft fits in what is left (one token comes from the verifier)
        try:
            plan = self.speculator.plan(setting, job.prompt, job.cache.length)
        except Exception:  # noqa: BLE001  (measuring failed: plain steps at this width)
            log.exception("measuring speculative decoding at %s failed; plain steps", width.name)
            self.speculator.disable(setting)
            plan = None
        if plan is not None and self._speculate(job, width, plan):
            return True
        t0 = time.perf_counter()
        self._decode(setting_key(setting), setting, [job])
        self.speculator.observe_plain(setting, time.perf_counter() - t0)
        return True

    def _speculate(self, job: Job, width: Width, plan: Plan) -> bool:
        """One round: `plan.k` greedy drafts at the draft's width in the job's slot (cropped
        away), one verify forward of them at the job's width, the accepted prefix and the
        verifier's next token delivered. False: the round failed, the job's cache is as before
        it (only positions from its length on were written) and speculation at this width is
        off; the caller takes a plain step."""
        setting, cache, cur = width.setting, job.cache, job.last
        assert setting is not None and cache is not None and cur is not None
        t0 = time.perf_counter()
        start = cache.length
        k = min(plan.k, job.max_tokens - len(job.tokens) - 1)
        try:
            drafts: list[int] = []
            tok = cur
            for _ in range(k):
                tok = int(self.stepper.step(plan.draft.setting, [cache], [tok])[0].argmax())
                drafts.append(tok)
            cache.crop(start)
            logits = self.stepper.forward_all(setting, cache, [cur, *drafts])  # (k+1, V)
            n, new = verify_drafts(job.sampler, logits, torch.tensor(drafts, dtype=torch.long))
            cache.crop(start + 1 + n)  # the verifier's entries of cur and the n accepted
        except Exception:  # noqa: BLE001  (a draft width failing must not fail the job)
            log.exception("speculative round at %s failed; plain steps", width.name)
            cache.length = start
            self.speculator.disable(setting)
            return False
        self.speculator.observe_round(setting, plan, k, n, time.perf_counter() - t0)
        job.drafted += k
        job.accepted += n
        self.metrics.inc("width_steps_total", width=width.name)
        self.metrics.inc("speculative_rounds_total", width=width.name)
        self.metrics.inc("speculative_drafted_tokens_total", k, width=width.name)
        self.metrics.inc("speculative_accepted_tokens_total", n, width=width.name)
        for tok in new:
            self._deliver(job, tok, width.name)
            if job.finished:
                break
        return True

    def _decode(self, key: Hashable, setting: Setting, jobs: list[Job]) -> None:
        name = self.catalog.named(setting).name
        t0 = time.perf_counter()
        try:
            logits = self.stepper.step(setting, [j.cache for j in jobs],  # type: ignore[misc]
                                       [j.last for j in jobs])  # type: ignore[misc]
            if all(j.sampler.greedy for j in jobs):  # one argmax, one read-back for the group
                picked = logits.argmax(-1).tolist()
            else:
                picked = [int(j.sampler.pick(logits[b])) for b, j in enumerate(jobs)]
        except Exception as e:  # noqa: BLE001  (one group's failure must not stop the server)
            log.exception("decoding step at %s failed", name)
            for job in jobs:
                self._fail(job, f"decoding failed: {type(e).__name__}")
            return
        self.table.observe(key, len(jobs), time.perf_counter() - t0)
        self.metrics.inc("width_steps_total", width=name)
        for job, tok in zip(jobs, picked, strict=True):
            self._deliver(job, tok, name)

    def _prefill(self, job: Job, auto_width: Width) -> None:
        width = job.width if job.width.setting is not None else auto_width
        setting = width.setting
        assert setting is not None
        t0 = time.perf_counter()
        try:
            if job.cache is None:
                job.cache = self.stepper.new_cache(setting, len(job.prompt) + job.max_tokens)
            chunk = job.prompt[job.fed:job.fed + self.prefill_chunk]
            logits = self.stepper.prefill(setting, job.cache, chunk)
            job.fed += len(chunk)
            tok = int(job.sampler.pick(logits)) if job.fed == len(job.prompt) else None
        except Exception as e:  # noqa: BLE001  (out of memory, a bad prompt: this job only)
            log.exception("prefill failed")
            self._fail(job, f"prefill failed: {type(e).__name__}")
            return
        self.table.observe(PREFILL_KEY, 1, time.perf_counter() - t0)
        self.metrics.inc("prompt_tokens_total", len(chunk))
        if tok is not None:
            self._deliver(job, tok, width.name)

    def _deliver(self, job: Job, tok: int, width: str) -> None:
        now = time.perf_counter()
        if job.first_at is None:
            job.first_at = now
            self.metrics.observe("time_to_first_token_seconds", now - job.arrived)
        else:
            self.metrics.observe("time_per_output_token_seconds", now - job.last_at)
        job.last_at = now
        job.tokens.append(tok)
        job.widths_used[width] += 1
        self.metrics.inc("generated_tokens_total", width=width)
        job.emit(Event("token", token=tok, width=width))
        if tok in job.eos:
            self._finish(job, "stop")
        elif len(job.tokens) >= job.max_tokens:
            self._finish(job, "length")
        else:
            job.last = tok

    def _finish(self, job: Job, reason: str | None = None) -> None:
        """Take `job` out of the batch (its cache freed); `reason` None: it was cancelled and
        nobody is listening."""
        job.finished = True
        self._free(job)
        if reason is not None:
            job.emit(Event("done", reason=reason))

    def _fail(self, job: Job, message: str) -> None:
        if job.finished:
            return
        job.finished = True
        self._free(job)
        job.emit(Event("error", message=message))

    def _free(self, job: Job) -> None:
        """Give the job's KV slot back to the pool."""
        if job.cache is not None:
            self.stepper.release(job.cache)
            job.cache = None

