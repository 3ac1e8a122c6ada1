"""`matformer plan`: the best slice of a checkpoint for a device, from a memory size and a
latency target, with every number measured on the device it runs on.

What users have is a device and a latency budget, not a parameter count (`slice --budget`). So:
1. costs (seconds, timed here): for every uniform (FFN width, KV heads) setting the candidates
   use, the checkpoint is sliced to it and loaded, as it would be deployed, and its decode step
   (one token for each of `batch` rows at cache position `context - 1`, the slowest step of a
   `context`-long generation) is timed, every layer within it too: each layer's cost at each
   width and head count is its share of that step; the rest (embedding, rotary, final norm,
   lm_head) is the step minus its layers. A plan's predicted latency is the rest plus its
   layers' costs. All settings and the stored model run in interleaved rounds; each time is a
   low quantile of its runs (`QUANTILE`).
2. memory (bytes, counted): the plan's weights at the checkpoint's dtype plus its KV cache for
   `batch` sequences of `context` tokens.
3. candidates, in the paper's least-slope order (as `slice --budget`): every uniform width the
   source holds (of the first four tiers) and every least-slope Mix'n'Match plan between
   neighbouring ones, crossed with every KV head granularity when the source's heads nest; those
   the `format` cannot write are left out (nemotron-nas: widths on its 256 grid, heads dividing
   the query heads). The candidates under both limits are scored by held-out loss on a few
   windows (runtime slicing gives the slice's exact loss), uniform ones always, the rest widest
   first up to `max_candidates`; the lowest loss wins (ties: the faster).
4. the winner is sliced into a temporary checkpoint, loaded and measured as deployed: its step
   time, its bytes, its loss on the same windows. Predicted and measured are reported side by
   side and written to PLAN.json, which `slice --plan` writes out.

The latency is matformer's own eager PyTorch decode step on this device; engines (llama.cpp,
vLLM) have other constant costs, but the per-layer costs they pay scale the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from matformer.errors import CheckpointError, ConfigError, TierError
from matformer.evaluation.lm import evaluation_windows
from matformer.inference.sampling import sync_device
from matformer.io.checkpoint import load_model, parse_size
from matformer.io.files import read_json
from matformer.io.source import Source, resolve_source
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import DecoderLayer, KVCache, MatFormerLM, lm_loss
from matformer.models.lm.numerics import hidden_act
from matformer.models.lm.shapes import (
    format_count,
    kv_cache_bytes_per_token,
    non_embedding_parameters,
    parameter_counts,
)
from matformer.models.registry import LM
from matformer.slicing.extract import DEFAULT_GRANULARITIES, heads_nest, slice_checkpoint
from matformer.slicing.nemotron_nas import plan_nemotron_nas
from matformer.tiers import (
    describe_heads,
    describe_widths,
    least_slope_plans,
    max_tier,
    runnable_kv_heads,
    width_of,
)

FORMATS = ("hf", "gguf", "nemotron-nas")
PLAN_VERSION = 1
DEFAULT_CONTEXT = 512
DEFAULT_WINDOWS = 8
DEFAULT_MAX_CANDIDATES = 24


# ---- costs ----------------------------------------------------------------------------------


@dataclass
class StepCosts:
    """Seconds of one decode step (`batch` rows, cache position `position`), measured here."""

    device: str
    batch: int
    position: int
    layers: list[dict[str, float]]
    """Per layer: "width,kv_heads" -> seconds of that layer within the step."""
    rest: float
    """The step minus its layers (embedding, rotary, final norm, lm_head, the loop)."""
    uniform: dict[str, float]
    """"width,kv_heads" -> the whole step of the model at that setting in every layer."""
    stored: float
    """The stored model's whole step, timed in the same rounds (a load reference)."""
    seconds: float = 0.0
    """Time spent measuring."""

    def layer(self, i: int, width: int, kv_heads: int) -> float:
        return self.layers[i][f"{width},{kv_heads}"]

    def predict(self, widths: Sequence[int], kv_heads: Sequence[int]) -> float:
        """Predicted seconds of a step of the plan (`widths`, `kv_heads` per layer)."""
        return self.rest + sum(self.layer(i, w, g)
                               for i, (w, g) in enumerate(zip(widths, kv_heads, strict=True)))


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    sync_device(device)
    t0 = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - t0


QUANTILE = 0.2
"""Timings report this quantile of their runs, not the median: on a shared machine another
process takes the core for bursts, which only ever add time; the fast fifth of the runs is what
the code costs (on a dedicated device the two agree closely)."""


def low_quantile(times: Sequence[float], q: float = QUANTILE) -> float:
    """The `q` quantile of `times` (nearest rank)."""
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def interleaved_times(fns: Sequence[Callable[[], Any]], device: torch.device,
                      reps: int) -> list[list[float]]:
    """Seconds of each of `fns` over `reps` rounds, each round running every fn in turn (after
    two warm-up rounds): a burst of load from another process then lands on every option alike
    instead of on one option's block of runs. In a round each fn runs once untimed and then
    once timed, so it is timed with its weights in the CPU's caches, as a decoding loop that
    runs one model step after step has them (not evicted by the other options)."""
    for _ in range(2):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            fn()
            times[k].append(_time_once(fn, device))
    return times


def _step(model: MatFormerLM, layers: Sequence[DecoderLayer], caches: Sequence[KVCache],
          ids: torch.Tensor, position: int, laps: list[float] | None = None) -> torch.Tensor:
    """One decode step of `model`'s embedding, head and rotary around `layers` (each with its
    one-layer cache): `MatFormerLM.forward` at cache position `position`. With `laps`, each
    layer's seconds are appended (the device synchronised around each)."""
    dev = ids.device
    x = model.model.embed_tokens(ids)
    pos = torch.full(ids.shape, position, device=dev)
    cos, sin = model.rotary(pos, x.dtype)
    for layer, cache in zip(layers, caches, strict=True):
        if laps is None:
            x = layer(x, cos, sin, cache, position)
            continue
        sync_device(dev)
        t0 = time.perf_counter()
        x = layer(x, cos, sin, cache, position)
        sync_device(dev)
        laps.append(time.perf_counter() - t0)
    return model.lm_head(model.model.norm(x))


def measure_step_costs(model: MatFormerLM, options: dict[tuple[int, int], MatFormerLM], *,
                       batch: int, position: int, reps: int) -> StepCosts:
    """Time the decode step of each model in `options` (the checkpoint sliced to that uniform
    (width, kv_heads) and loaded, as deployed), every layer of it within the step, and the
    stored `model`'s step; all in interleaved rounds (see `interleaved_times`). Each layer's cost
    at a setting is its share of that setting's whole step; the rest (embedding, head) is the
    step minus its layers, the same at every setting."""
    t_start = time.perf_counter()
    dev = model.model.embed_tokens.weight.device
    n = len(model.model.layers)
    ids = torch.ones(batch, 1, dtype=torch.long, device=dev)
    keys = list(options)
    laps: dict[int, list[list[float]]] = {k: [[] for _ in range(n)] for k in range(len(keys))}
    rests: list[float] = []
    fns: list[Callable[[], Any]] = []
    with torch.inference_mode():
        stored_cache = model.new_cache(batch, position + 1)
        fns.append(lambda: model(ids, cache=stored_cache, start=position))
        for k, key in enumerate(keys):
            m = options[key]
            cache = m.new_cache(batch, position + 1)
            layers, caches = list(m.model.layers), [cache] * n

            def instrumented(k: int = k, m: MatFormerLM = m, layers: list = layers,
                             caches: list = caches) -> None:
                lap: list[float] = []
                sync_device(dev)
                t0 = time.perf_counter()
                _step(m, layers, caches, ids, position, lap)
                sync_device(dev)
                rests.append(time.perf_counter() - t0 - sum(lap))
                for i, t in enumerate(lap):
                    laps[k][i].append(t)

            fns.append(lambda m=m, cache=cache: m(ids, cache=cache, start=position))
            fns.append(instrumented)
        times = interleaved_times(fns, dev, reps)
    rest = low_quantile(rests)
    layer_costs: list[dict[str, float]] = [{} for _ in range(n)]
    uniform = {}
    for k, (w, g) in enumerate(keys):
        step = low_quantile(times[1 + 2 * k])
        uniform[f"{w},{g}"] = step
        parts = [low_quantile(laps[k][i]) for i in range(n)]
        # the layers' share of the step as it runs unsynchronised (on a CPU the two agree; a
        # GPU overlaps launches when nothing waits between layers)
        scale = max(step - rest, 0.0) / sum(parts)
        for i in range(n):
            layer_costs[i][f"{w},{g}"] = parts[i] * scale
    return StepCosts(str(dev), batch, position, layer_costs, rest, uniform,
                     low_quantile(times[0]), time.perf_counter() - t_start)


def measure_model_step(model: MatFormerLM, *, batch: int, position: int, reps: int) -> float:
    """Seconds of the whole model's decode step (one token per row at `position`) at its
    current widths, with a cache of `position + 1` columns (the `QUANTILE` of `reps` runs)."""
    dev = model.model.embed_tokens.weight.device
    ids = torch.ones(batch, 1, dtype=torch.long, device=dev)
    with torch.inference_mode():
        cache = model.new_cache(batch, position + 1)
        return low_quantile(interleaved_times(
            [lambda: model(ids, cache=cache, start=position)], dev, reps)[0])


# ---- memory ---------------------------------------------------------------------------------


def plan_bytes(config: MatFormerConfig, widths: Sequence[int], kv_heads: Sequence[int], *,
               batch: int, context: int, itemsize: int) -> dict[str, int]:
    """Bytes the plan takes to run: its weights (a tied lm_head once) and its KV cache for
    `batch` sequences of `context` tokens, at `itemsize` bytes per element."""
    weights = parameter_counts(config, list(widths), list(kv_heads))["total"] * itemsize
    cache = batch * context * kv_cache_bytes_per_token(config, list(kv_heads), itemsize)
    return {"weights": weights, "kv_cache": cache, "total": weights + cache}


# ---- candidates -----------------------------------------------------------------------------


@dataclass
class Candidate:
    """One plan the search considers, with what was predicted and measured of it."""

    widths: list[int]
    kv_heads: list[int]
    kind: str
    """'uniform' (one width and head count everywhere) or 'mix' (least slope)."""
    non_embedding_params: int = 0
    latency_s: float = 0.0
    memory_bytes: int = 0
    fits: bool = False
    loss: float | None = None

    def name(self, base: int) -> str:
        return f"{describe_widths(base, self.widths)}, {describe_heads(self.kv_heads)}"


def candidates(config: MatFormerConfig, *, nest: bool, fmt: str) -> list[Candidate]:
    """Every plan in the search (see the module docstring), widest first; the uniform ones
    first among equals."""
    stored, stored_heads = config.layer_widths, config.layer_kv_heads
    base, n = config.base, config.num_hidden_layers
    n_tiers = min(max_tier(base), DEFAULT_GRANULARITIES - 1) + 1
    widths = sorted(w for w in (width_of(base, t) for t in range(n_tiers)) if w <= min(stored))
    heads = (runnable_kv_heads(config.base_kv_heads, stored_heads) if nest
             else [None])
    out: list[Candidate] = []
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    plans = [([w] * n, "uniform") for w in widths] + [
        (ws, "mix") for ws in least_slope_plans(widths, n)]
    for g in heads:
        hl = list(stored_heads) if g is None else [g] * n
        for ws, kind in plans:
            key = (tuple(ws), tuple(hl))
            if key in seen:
                continue
            seen.add(key)
            if fmt == "nemotron-nas":
                try:
                    plan_nemotron_nas(config, widths=ws, layer_kv_heads=hl)
                except TierError:
                    continue
            kind = "uniform" if len(set(ws)) == 1 else kind
            out.append(Candidate(list(ws), hl, kind,
                                 non_embedding_parameters(config, ws, hl)))
    out.sort(key=lambda c: (-c.non_embedding_params, c.kind != "uniform"))
    return out


# ---- the search -----------------------------------------------------------------------------


@dataclass
class PlanFile:
    """What `slice --plan` needs of a PLAN.json."""

    widths: list[int]
    kv_heads: list[int]
    skip_layers: list[int]
    format: str


@dataclass
class PlanReport:
    source: str
    device: str
    format: str
    batch: int
    context: int
    memory_limit: int
    latency_limit_s: float
    data: str
    windows: int
    seq_len: int
    chosen: Candidate
    measured: dict[str, float]
    costs: StepCosts
    considered: list[Candidate] = field(default_factory=list)
    base: int = 0
    seconds: float = 0.0

    def uniform_fitting(self) -> list[Candidate]:
        return [c for c in self.considered if c.kind == "uniform" and c.fits]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "source": self.source, "format": self.format,
            "widths": self.chosen.widths, "kv_heads": self.chosen.kv_heads, "skip_layers": [],
            "device": self.device, "batch": self.batch, "context": self.context,
            "limits": {"memory_bytes": self.memory_limit, "latency_ms": self.latency_limit_s * 1e3},
            "predicted": {"latency_ms": self.chosen.latency_s * 1e3,
                          "memory_bytes": self.chosen.memory_bytes, "loss": self.chosen.loss},
            "measured": self.measured,
            "data": {"description": self.data, "windows": self.windows, "seq_len": self.seq_len},
            "candidates": [asdict(c) for c in self.considered],
            "step_costs": asdict(self.costs),
            "seconds": self.seconds,
        }

    def format_table(self) -> str:
        c, m = self.chosen, self.measured
        lat_err = (c.latency_s * 1e3 - m["latency_ms"]) / m["latency_ms"] * 100
        lines = [
            f"plan for {self.source} on {self.device}: batch {self.batch}, context {self.context},"
            f" format {self.format}; limits {self.memory_limit / 1e6:.1f} MB, "
            f"{self.latency_limit_s * 1e3:.2f} ms/step",
            f"searched {len(self.considered)} plans ({sum(x.fits for x in self.considered)} fit "
            f"both limits); loss on {self.windows} held-out windows x {self.seq_len} tokens "
            f"({self.data})",
            "",
            f"{'plan':<58} {'params':>8} {'ms/step':>8} {'MB':>8} {'loss':>7}",
        ]
        for x in self.considered:
            if x.loss is None and not (x.kind == "uniform"):
                continue
            mark = "*" if x is c else ("" if x.fits else " (over)")
            loss = f"{x.loss:.4f}" if x.loss is not None else "-"
            lat = f"{x.latency_s * 1e3:.3f}" if x.latency_s else "-"  # over memory: not timed
            lines.append(f"{x.name(self.base)[:56] + mark:<58} "
                         f"{format_count(x.non_embedding_params):>8} {lat:>8} "
                         f"{x.memory_bytes / 1e6:8.2f} {loss:>7}")
        lines += [
            "",
            f"chose: {c.name(self.base)}",
            f"  latency  predicted {c.latency_s * 1e3:.3f} ms/step, measured "
            f"{m['latency_ms']:.3f} ms/step ({lat_err:+.1f}%)",
            f"  (the stored model's step: {m['stored_step_ms_during_search']:.3f} ms in the search, "
            f"{m['stored_step_ms']:.3f} ms beside the slice: the machine's load changed by "
            f"{(m['stored_step_ms'] / m['stored_step_ms_during_search'] - 1) * 100:+.0f}%)",
            f"  memory   predicted {c.memory_bytes / 1e6:.2f} MB, measured "
            f"{m['memory_bytes'] / 1e6:.2f} MB",
            f"  loss     predicted {c.loss:.4f}, measured {m['loss']:.4f} (the slice, same "
            f"windows)",
        ]
        return "\n".join(lines)


def plan_device(src: str | os.PathLike | Source, *, memory: int | str, latency_ms: float,
                device: str = "cpu", batch: int = 1, fmt: str = "hf",
                context: int | None = None, data: Any = None, windows: int = DEFAULT_WINDOWS,
                seq_len: int | None = None, reps: int = 7,
                max_candidates: int = DEFAULT_MAX_CANDIDATES,
                progress: Callable[[str], None] | None = None) -> PlanReport:
    """The best plan of `src` under `memory` bytes and `latency_ms` per decode step on `device`
    (see the module docstring). Raises a one-line ConfigError when no plan fits."""
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    try:
        limit = parse_size(memory)
    except CheckpointError:
        raise ConfigError(f"--memory {str(memory)[:40]!r} is not a size like 2GB or 500MB "
                          f"(decimal units; GiB/MiB binary)") from None
    if not latency_ms > 0:
        raise ConfigError(f"--latency-ms must be a positive number of milliseconds, got "
                          f"{latency_ms!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch < 1:
        raise ConfigError(f"--batch must be a positive integer, got {batch}")
    source = src if isinstance(src, Source) else resolve_source(src, companions=True)
    config = source.config
    if source.family is not LM or not isinstance(config, MatFormerConfig):
        raise ConfigError(f"{source.describe()}: `plan` plans language models; this is a "
                          f"{source.family.name!r} checkpoint")
    if fmt == "gguf" and hidden_act(config) not in ("silu", "swish"):
        raise ConfigError(f"--format gguf: hidden_act={hidden_act(config)!r}; llama.cpp runs "
                          f"silu only, so no slice of this checkpoint exports with its logits")
    if fmt == "nemotron-nas":  # refuse what the format can never describe before measuring
        try:
            plan_nemotron_nas(config)
        except TierError:
            pass  # the stored widths may be off the grid; the candidates are filtered below
    context = min(context or DEFAULT_CONTEXT, config.max_position_embeddings)
    if context < 1:
        raise ConfigError(f"--context must be a positive number of tokens, got {context}")
    cands = candidates(config, nest=heads_nest(source), fmt=fmt)
    if not cands:
        raise ConfigError(f"{source.describe()}: no plan of this checkpoint can be written as "
                          f"{fmt} (see docs/DEPLOY.md)")
    itemsize = config.dtype.itemsize  # the model runs in its stored dtype
    for c in cands:  # memory is counted: refuse before anything is loaded or timed
        c.memory_bytes = plan_bytes(config, c.widths, c.kv_heads, batch=batch, context=context,
                                    itemsize=itemsize)["total"]
    small = [c for c in cands if c.memory_bytes <= limit]
    if not small:
        least = min(c.memory_bytes for c in cands)
        raise ConfigError(
            f"no plan of {source.describe()} fits {limit / 1e6:.2f} MB (batch {batch}, context "
            f"{context}): the smallest needs {least / 1e6:.2f} MB; raise --memory, or lower "
            f"--batch/--context")
    say(f"loading {source.describe()} on {device}")
    model = load_model(source, device=device).eval()
    options: list[tuple[int, int]] = []
    for c in small:
        for w, g in zip(c.widths, c.kv_heads, strict=True):
            if (w, g) not in options:
                options.append((w, g))
    say(f"timing the step at {len(options)} (width, KV heads) settings, every layer within it "
        f"(batch {batch}, position {context - 1})")
    with tempfile.TemporaryDirectory(prefix="matformer-plan-") as tmp:
        models = {}
        for w, g in options:  # each setting as deployed: sliced, then loaded
            folder = Path(tmp) / f"w{w}-g{g}"
            slice_checkpoint(source, folder, widths=w, kv_heads=g)
            models[(w, g)] = load_model(folder, device=device).eval()
    costs = measure_step_costs(model, models, batch=batch, position=context - 1, reps=reps)
    del models
    for c in small:
        c.latency_s = costs.predict(c.widths, c.kv_heads)
        c.fits = c.latency_s <= latency_ms / 1e3
    fitting = [c for c in small if c.fits]
    if not fitting:
        fastest = min(small, key=lambda c: c.latency_s)
        raise ConfigError(
            f"no plan of {source.describe()} within {limit / 1e6:.2f} MB runs a step in "
            f"{latency_ms:g} ms on {costs.device} (batch {batch}, context {context}): the fastest"
            f" takes {fastest.latency_s * 1e3:.3f} ms; raise --latency-ms or --memory, or lower "
            f"--batch/--context")
    scored = [c for c in fitting if c.kind == "uniform"]
    scored += [c for c in fitting if c.kind != "uniform"][:max(0, max_candidates - len(scored))]
    win, desc = evaluation_windows(source, data, seq_len=seq_len, max_windows=windows,
                                   max_positions=config.max_position_embeddings, progress=say)
    say(f"scoring {len(scored)} plans on {win.shape[0]} windows x {win.shape[1]} tokens")
    ids = torch.as_tensor(win, device=model.model.embed_tokens.weight.device)
    with torch.inference_mode():
        for c in scored:
            model.set_widths(widths=c.widths, layer_kv_heads=c.kv_heads)
            c.loss = float(lm_loss(model(ids).float(), ids))
    best = min(scored, key=lambda c: (c.loss, c.latency_s))
    model.set_widths()  # back to the stored model: its step is timed again beside the slice's
    measured = measure_plan(source, best, model, batch=batch, context=context, ids=ids.cpu(),
                            device=device, reps=reps, say=say)
    measured["stored_step_ms_during_search"] = costs.stored * 1e3
    return PlanReport(source.describe(), costs.device, fmt, batch, context, limit,
                      latency_ms / 1e3, desc, int(win.shape[0]), int(win.shape[1]), best,
                      measured, costs, cands, config.base, time.perf_counter() - t0)


def measure_plan(source: Source, plan: Candidate, stored: MatFormerLM, *, batch: int,
                 context: int, ids: torch.Tensor, device: str, reps: int,
                 say: Callable[[str], None]) -> dict[str, float]:
    """The plan as deployed: sliced into a temporary checkpoint, loaded, its decode step timed
    (in rounds with the `stored` model's step, so a change of machine load since the search
    shows as a change of the stored step's time), its bytes (weights and the KV cache) and its
    loss on `ids` measured."""
    with tempfile.TemporaryDirectory(prefix="matformer-plan-") as tmp:
        say("slicing the chosen plan and measuring it")
        slice_checkpoint(source, Path(tmp) / "slice", widths=plan.widths,
                         layer_kv_heads=plan.kv_heads)
        model = load_model(Path(tmp) / "slice", device=device).eval()
    dev = model.model.embed_tokens.weight.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    position = context - 1
    with torch.inference_mode():
        step_ids = torch.ones(batch, 1, dtype=torch.long, device=dev)
        c_slice, c_stored = model.new_cache(batch, position + 1), stored.new_cache(batch, position + 1)
        # more rounds than the search's: two fns a round instead of one per setting
        times = interleaved_times([lambda: model(step_ids, cache=c_slice, start=position),
                                   lambda: stored(step_ids, cache=c_stored, start=position)],
                                  dev, reps * 4)
        cache = model.new_cache(batch, context)
        cache_bytes = sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        loss = float(lm_loss(model(ids.to(dev)).float(), ids.to(dev)))
    out = {"latency_ms": low_quantile(times[0]) * 1e3, "memory_bytes": weights + cache_bytes,
           "weights_bytes": weights, "kv_cache_bytes": cache_bytes, "loss": loss,
           "stored_step_ms": low_quantile(times[1]) * 1e3}
    if dev.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


# ---- PLAN.json --------------------------------------------------------------------------------


def plan_json(report: PlanReport) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def read_plan(path: str | os.PathLike) -> PlanFile:
    """The widths, KV heads, skipped layers and format of a PLAN.json (one-line errors)."""
    d = read_json(Path(path))
    try:
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
            raise ValueError(f"not a version-{PLAN_VERSION} plan")
        plan = PlanFile([int(w) for w in d["widths"]], [int(g) for g in d["kv_heads"]],
                        [int(i) for i in d.get("skip_layers") or []], str(d.get("format", "hf")))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: not a plan written by `matformer plan` ({e}); run it "
                          f"again") from None
    if plan.format not in FORMATS:
        raise ConfigError(f"{path}: format {plan.format!r} is not one of {', '.join(FORMATS)}")
    return plan

