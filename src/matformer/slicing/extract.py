"""Extraction: cut a tier or a Mix'n'Match submodel out of a checkpoint into a real, smaller one.

What it does (never builds a model; see docs/SLICING.md):
- plan: turn a request (`tier`, per-layer `widths` / `layer_tiers`, a non-embedding parameter
  `budget`, optional `skip_layers`) into per-layer output widths and the list of source layers
  kept. Every output width must be held by the source (slicing a sliced checkpoint further is
  fine; asking for more than it stores is a `TierError`).
- stream: for each output tensor, read only what it needs from the source shard and hand it to
  the checkpoint writer, which writes it and lets it go before the next one is read. FFN slices
  are prefixes: rows [:m] of gate_proj/up_proj ([I, H]) are one contiguous byte range; columns
  [:, :m] of down_proj ([H, I]) are H short runs, read row block by row block. Heads (the second
  axis, `kv_heads`/`layer_kv_heads`) are prefixes too: rows [:g*r*hd] of q_proj, [:g*hd] of
  k_proj/v_proj, columns [:, :g*r*hd] of o_proj. Peak memory is about one (sliced) tensor,
  whatever the model's size.
- multi-tier: `tiers=[1, 2, 3]` writes OUT/tier-1/, OUT/tier-2/, ... (each with the source's
  tokenizer) and OUT/matformer_manifest.json (`io.manifest`: schema version, base width, per tier
  its width and files with sizes and sha256), from which `io.source` fetches and verifies only
  one tier's files.

The source is anything `io.source.resolve_source` takes (a multi-tier repo too: the tier folder
that holds the requested widths is used); reading goes through `io.tensors.TensorReader`.

Budget heuristic (MatFormer paper, Mix'n'Match): widths non-decreasing with depth and as few
changes as possible ("least slope"): between the two adjacent granularities whose uniform models
bracket the budget, the first layers take the narrower one and the last k layers the wider one,
k as large as the budget allows. That is at most one change, between neighbouring granularities.
When the source's heads nest (`heads_nest`), every head granularity (G, G/2, ..., 1 KV heads in
all layers) is crossed with those width lists and the largest pair within budget wins.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matformer.errors import CheckpointError, ConfigError, MatFormerError, TierError
from matformer.io.checkpoint import open_checked, write_checkpoint
from matformer.io.files import read_json
from matformer.io.layout import Checkpoint
from matformer.io.manifest import MANIFEST_NAME, write_manifest
from matformer.io.outputs import check_output_folder
from matformer.io.source import COMPANION_FILES, Source, resolve_source
from matformer.io.tensors import ReadJob, TensorReader
from matformer.models.lm.shapes import format_count, parse_count
from matformer.models.registry import (
    Config,
    expected_shapes,
    family_of_config,
    non_embedding_parameters,
)
from matformer.tiers import (
    WidthRequest,
    check_heads_held,
    check_held,
    describe_heads,
    least_slope_plans,
    max_tier,
    resolve_kv_heads,
    runnable_kv_heads,
    tier_of,
    width_of,
)

# The paper's granularities: g = 4 widths, d_ff/8 .. d_ff (tiers 0..3).
DEFAULT_GRANULARITIES = 4

# ---- planning ------------------------------------------------------------------------------


@dataclass
class SlicePlan:
    """What to write: output config, which source layers are kept (in order), their widths."""

    source: Config
    config: Config
    keep_layers: list[int]
    widths: list[int]
    explanation: str
    kv_heads: list[int]
    """KV heads of each output layer."""

    @property
    def tier(self) -> int | None:
        return self.config.stored_tier

    def describe(self) -> str:
        t = self.tier
        what = f"tier {t} (width {self.widths[0]})" if t is not None else f"widths {self.widths}"
        what += f", {describe_heads(self.kv_heads)}"
        skipped = sorted(set(range(self.source.num_hidden_layers)) - set(self.keep_layers))
        if skipped:
            what += f", layers {skipped} dropped ({len(self.keep_layers)} kept)"
        return what


def plan_budget(
    config: Config,
    budget: int | str,
    *,
    skip_layers: Sequence[int] | None = None,
    granularities: int = DEFAULT_GRANULARITIES,
) -> tuple[list[int], str]:
    """Pick per-layer widths for a non-embedding parameter `budget` by the paper's Mix'n'Match
    heuristic (the FFN axis only; heads as stored); returns (widths of the kept layers, a human
    explanation of the choice). See `plan_budget_heads`."""
    ws, _, why = plan_budget_heads(config, budget, skip_layers=skip_layers,
                                   granularities=granularities, search_heads=False)
    return ws, why


def plan_budget_heads(
    config: Config,
    budget: int | str,
    *,
    skip_layers: Sequence[int] | None = None,
    granularities: int = DEFAULT_GRANULARITIES,
    search_heads: bool = True,
    kv_heads: Sequence[int] | None = None,
) -> tuple[list[int], list[int], str]:
    """Pick per-layer widths and KV heads for a non-embedding parameter `budget`; returns (widths
    and KV heads of the kept layers, a human explanation of the choice).

    FFN candidates are the first `granularities` tiers of the base (the paper's S/M/L/XL),
    limited to what `config` stores in each layer. Among width lists that are non-decreasing with
    depth and switch at most once between two adjacent granularities, take the largest one within
    budget (ties: fewer changes). With `search_heads`, every head granularity the kept layers hold
    (G, G/2, ..., 1, the same in every layer) is crossed with those width lists and the largest
    pair within budget wins (ties: more heads); otherwise the heads stay `kv_heads` (one per kept
    layer; default: as stored).
    `skip_layers` are source layer indices dropped before planning.
    """
    budget = parse_count(budget)
    if budget <= 0:
        raise ConfigError(f"budget must be a positive parameter count, got {budget}")
    keep = _keep_layers(config, skip_layers)
    stored = [config.layer_widths[i] for i in keep]
    stored_heads = [config.layer_kv_heads[i] for i in keep]
    base = config.base
    n_tiers = min(max_tier(base), granularities - 1) + 1
    # widest first; keep only widths some layer can hold
    cands = [width_of(base, t) for t in range(n_tiers)]
    cands = [w for w in cands if w <= max(stored)]
    if not cands:
        raise TierError(
            f"the source stores widths {stored}, narrower than every granularity "
            f"{[width_of(base, t) for t in range(n_tiers)]} of base {base}; use --widths"
        )
    cands.sort()  # narrow -> wide
    L = len(stored)
    head_opts = ([[g] * L for g in runnable_kv_heads(config.base_kv_heads, stored_heads)]
                 if search_heads else [list(kv_heads) if kv_heads is not None else stored_heads])
    options: list[tuple[int, int, int, list[int], list[int]]] = []  # (params, -changes, heads..)
    # every least-slope plan between adjacent granularities, and each granularity alone
    for ws in least_slope_plans(cands, L) + [[w] * L for w in cands]:
        if any(w > s for w, s in zip(ws, stored, strict=True)):
            continue
        for hl in head_opts:
            p = non_embedding_parameters(config, ws, hl)
            if p <= budget:
                changes = sum(1 for a, b in zip(ws, ws[1:], strict=False) if a != b)
                options.append((p, -changes, sum(hl), ws, hl))
    layers_note = f"{L} layers" + (f" (layers {sorted(set(range(config.num_hidden_layers)) - set(keep))} dropped)" if L != config.num_hidden_layers else "")
    uniform_lines = _uniform_lines(config, cands, stored, head_opts, L)
    if not options:
        smallest = min(non_embedding_parameters(config, [cands[0]] * L, hl) for hl in head_opts)
        raise TierError(
            f"budget {format_count(budget)} ({budget:,}) non-embedding parameters is below the "
            f"smallest submodel, {format_count(smallest)} ({smallest:,}) at width {cands[0]} with "
            f"{layers_note}; raise the budget or drop layers with --skip-layers"
        )
    p, neg_changes, _, ws, hl = max(options, key=lambda o: (o[0], o[1], o[2]))
    choice = _describe_choice(base, ws, L) + (f", {describe_heads(hl)}" if search_heads else "")
    axes = ("widths non-decreasing with depth, at most one change between adjacent granularities "
            "(least slope)" + (", crossed with every head granularity the source holds "
                               "(G, G/2, ..., 1 KV heads)" if search_heads else ""))
    explanation = "\n".join(
        [
            f"budget: {format_count(budget)} ({budget:,}) non-embedding parameters, {layers_note}",
            "uniform submodels:",
            *uniform_lines,
            f"chose: {choice}: {format_count(p)} ({p:,}), {100.0 * p / budget:.1f}% of the budget",
            f"why: the paper's Mix'n'Match heuristic — {axes}; the largest such model within the "
            f"budget",
        ]
    )
    return ws, hl, explanation


def _uniform_lines(config: Config, cands: list[int], stored: list[int],
                   head_opts: list[list[int]], L: int) -> list[str]:
    lines = []
    for hl in head_opts:
        heads = f", {describe_heads(hl)}" if len(head_opts) > 1 else ""
        for w in cands:
            t = tier_of(config.base, w)
            fits = all(w <= s for s in stored)
            p = non_embedding_parameters(config, [w] * L, hl)
            lines.append(f"  tier {t} (width {w}){heads} everywhere: {format_count(p)} ({p:,})"
                         + ("" if fits else " — not held by the source"))
    return lines


def _describe_choice(base: int, ws: list[int], L: int) -> str:
    if all(w == ws[0] for w in ws):
        return f"tier {tier_of(base, ws[0])} (width {ws[0]}) in all {L} layers"
    k = sum(1 for w in ws if w == ws[-1])
    return (f"width {ws[0]} (tier {tier_of(base, ws[0])}) in {_span(0, L - k - 1)}, width "
            f"{ws[-1]} (tier {tier_of(base, ws[-1])}) in {_span(L - k, L - 1)}")


def _span(a: int, b: int) -> str:
    return f"layer {a}" if a == b else f"layers {a}-{b}"


def _keep_layers(config: Config, skip_layers: Sequence[int] | None) -> list[int]:
    n = config.num_hidden_layers
    if not skip_layers:
        return list(range(n))
    skip = [int(i) for i in skip_layers]
    for i in skip:
        if not 0 <= i < n:
            raise ConfigError(f"skip_layers: layer {i} does not exist (the source has layers 0-{n - 1})")
    if len(set(skip)) != len(skip):
        raise ConfigError(f"skip_layers: {skip} names a layer twice")
    keep = [i for i in range(n) if i not in set(skip)]
    if not keep:
        raise ConfigError(f"skip_layers: {skip} drops all {n} layers; keep at least one")
    return keep


def plan_slice(
    source: Config,
    *,
    tier: int | None = None,
    widths: int | Sequence[int] | None = None,
    layer_tiers: Sequence[int] | None = None,
    budget: int | str | None = None,
    skip_layers: Sequence[int] | None = None,
    kv_heads: int | None = None,
    layer_kv_heads: Sequence[int] | None = None,
    search_heads: bool = False,
) -> SlicePlan:
    """Validate a request against the source config and return the output plan.

    Per-layer `widths` / `layer_tiers` / `layer_kv_heads` may list every source layer (skipped
    ones are then ignored) or only the kept layers. Widths are absolute; tiers are relative to
    the base. `kv_heads`/`layer_kv_heads` cut the heads (default: as stored); with `budget`,
    `search_heads` lets the planner choose the heads too (a given `kv_heads` pins them)."""
    request = _request(tier, widths, layer_tiers, budget, kv_heads, layer_kv_heads)
    return _plan(source, request, budget, skip_layers, search_heads)


def _request(tier: int | None, widths: int | Sequence[int] | None,
             layer_tiers: Sequence[int] | None, budget: int | str | None, kv_heads: int | None,
             layer_kv_heads: Sequence[int] | None) -> WidthRequest:
    """The width request of a slice: at most one of the FFN keywords and `budget`."""
    given = [n for n, v in (("tier", tier), ("widths", widths), ("layer_tiers", layer_tiers),
                            ("budget", budget)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of tier, widths, layer_tiers, budget (got {', '.join(given)})")
    return WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths, kv_heads=kv_heads,
                        layer_kv_heads=layer_kv_heads)


def _plan(source: Config, request: WidthRequest, budget: int | str | None,
          skip_layers: Sequence[int] | None, search_heads: bool) -> SlicePlan:
    """`plan_slice` for one width request (or a `budget` with the request's heads)."""
    keep = _keep_layers(source, skip_layers)
    base, stored, n_keep = source.base, source.layer_widths, len(keep)
    explanation = ""
    out_heads = _out_heads(source, keep, request.heads())
    if budget is not None:
        out_widths, out_heads, explanation = plan_budget_heads(
            source, budget, skip_layers=skip_layers,
            search_heads=search_heads and not request.names_heads, kv_heads=out_heads)
    elif request.names_ffn:
        out_widths = _out_widths(source, keep, request.ffn())
    else:
        out_widths = [stored[i] for i in keep]  # only dropping layers (or a plain copy)
    # Every output width must be held by the source layer it is cut from.
    check_held(base, [stored[i] for i in keep], out_widths, layers=keep, holder="the source",
               remedy="slice from a checkpoint that holds it")
    cfg = copy.deepcopy(source)
    if hasattr(cfg, "keep_layers"):  # per-layer keys (a Qwen's layer_types) follow the layers
        cfg.keep_layers(keep)
    cfg.num_hidden_layers = n_keep
    if hasattr(cfg, "keep_layers"):  # per-layer keys beyond the nested ones (Gemma 3's layer_types)
        cfg.keep_layers(keep)
    cfg.intermediate_size = list(out_widths)
    cfg.num_key_value_heads = list(out_heads)
    cfg.num_attention_heads = [g * source.group_size for g in out_heads]
    cfg.matformer_tier = None
    cfg.__post_init__()
    cfg = cfg.with_widths(cfg.intermediate_size)  # recomputes matformer_tier from the sizes
    if not explanation:
        explanation = _explain(cfg, out_widths, out_heads, source, keep)
    return SlicePlan(source=source, config=cfg, keep_layers=keep, widths=list(out_widths),
                     explanation=explanation, kv_heads=list(out_heads))


def _out_widths(source: Config, keep: list[int], request: WidthRequest) -> list[int]:
    """FFN widths of each kept layer for the FFN `request` (a per-layer list may name every
    source layer or only the kept ones); whether the source holds them is checked after."""
    n_keep = len(keep)
    per = request.widths if request.widths is not None else request.layer_tiers
    if per is None or isinstance(per, int):
        return request.resolve_ffn(source.base, n_keep) or []
    name = "widths" if request.widths is not None else "layer_tiers"
    lst = _per_kept(list(per), keep, source.num_hidden_layers, name)
    return WidthRequest(**{name: lst}).resolve_ffn(source.base, n_keep) or []


def _per_kept(lst: list[int], keep: list[int], n_src: int, name: str) -> list[int]:
    """A per-layer list given for every source layer or only the kept ones -> the kept ones."""
    n_keep = len(keep)
    if len(lst) == n_src and n_src != n_keep:
        return [lst[i] for i in keep]
    if len(lst) != n_keep:
        need = f"{n_keep}" + (f" (the kept layers) or {n_src} (all source layers)" if n_keep != n_src else "")
        raise TierError(f"{name} has {len(lst)} entries; the model needs {need}")
    return lst


def _out_heads(source: Config, keep: list[int], request: WidthRequest) -> list[int]:
    """KV heads of each kept layer for the head `request` (default: as stored), each held by
    its source layer."""
    stored = [source.layer_kv_heads[i] for i in keep]
    if not request.names_heads:
        return stored
    per = None if request.layer_kv_heads is None else _per_kept(
        list(request.layer_kv_heads), keep, source.num_hidden_layers, "layer_kv_heads")
    out = resolve_kv_heads(source.base_kv_heads, len(keep), kv_heads=request.kv_heads,
                           layer_kv_heads=per)
    dropped = len(keep) != source.num_hidden_layers
    check_heads_held(stored, out, layers=keep if dropped else None, holder="the source",
                     uniform=request.kv_heads,
                     remedy="slice from a checkpoint that holds them")
    return out


def _explain(cfg: Config, out_widths: list[int], out_heads: list[int],
             source: Config, keep: list[int]) -> str:
    t = cfg.stored_tier
    n_keep, n_src = len(keep), source.num_hidden_layers
    text = (f"tier {t}: width {out_widths[0]} in all {n_keep} layers" if t is not None
            else f"per-layer widths {out_widths} (no uniform tier)")
    if out_heads != [source.layer_kv_heads[i] for i in keep]:
        text += f"; {describe_heads(out_heads)} of base {source.base_kv_heads}"
        q = out_heads[0] * source.group_size
        if len(set(out_heads)) == 1 and source.hidden_size % q:
            text += (f" (transformers' Llama refuses hidden_size {source.hidden_size} with {q} "
                     f"query heads, not a divisor; matformer loads it; the granularities "
                     f"G, G/2, ... always divide)")
    if n_keep != n_src:
        text += f"; dropped layers {sorted(set(range(n_src)) - set(keep))}, renumbered the rest"
    return text


# ---- tensor mapping ------------------------------------------------------------------------


@dataclass
class TensorJob:
    """One output tensor: where it comes from and which part of the source tensor it is."""

    out_name: str
    src_name: str
    dtype: str  # safetensors dtype string ("F32", "BF16", ...)
    src_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kind: str  # "copy" | "rows" (prefix of dim 0) | "cols" (prefix of dim 1 of a 2-D tensor)


def map_tensors(plan: SlicePlan, src_tensors: Sequence[tuple[str, str, Sequence[int]]]) -> list[TensorJob]:
    """Map the source's (name, dtype, shape) list (in file order) onto the output tensors.

    Layers not kept are dropped; kept layers are renumbered 0..n-1 in order (the family's
    per-layer names, `Family.layer_of`). Every nested tensor of every family is a prefix of one
    dimension (FFN neurons; attention heads by KV group), so each output tensor is the source
    tensor cut to the shape the output config expects: rows (a prefix of dim 0) or columns (of
    dim 1). A source tensor is checked against the shape the source config says it stores (a
    mismatch names the tensor and both shapes)."""
    fam = family_of_config(plan.source)
    new_index = {src: j for j, src in enumerate(plan.keep_layers)}
    have = expected_shapes(plan.source)
    want = expected_shapes(plan.config)
    jobs: list[TensorJob] = []
    for name, dtype, shape in src_tensors:
        shape = tuple(int(d) for d in shape)
        at = fam.layer_of(name)
        out_name = name
        if at is not None:
            i, rest = at
            if i >= plan.source.num_hidden_layers:
                raise CheckpointError(
                    f"tensor {name!r}: layer {i} does not exist in a model of "
                    f"{plan.source.num_hidden_layers} layers (config.json num_hidden_layers)"
                )
            if i not in new_index:
                continue
            out_name = fam.layer_name(new_index[i], rest)
        if name in have:
            _expect(name, shape, have[name])
        out = want.get(out_name, shape)
        jobs.append(TensorJob(out_name, name, dtype, shape, out, _cut(name, shape, out)))
    return jobs


def _cut(name: str, shape: tuple[int, ...], out: tuple[int, ...]) -> str:
    """'copy', 'rows' (a prefix of dim 0) or 'cols' (a prefix of dim 1 of a 2-D tensor)."""
    if out == shape:
        return "copy"
    if len(out) == len(shape) and out[1:] == shape[1:] and out[0] < shape[0]:
        return "rows"
    if len(out) == len(shape) == 2 and out[0] == shape[0] and out[1] < shape[1]:
        return "cols"
    raise CheckpointError(f"tensor {name!r}: shape {list(shape)} cannot be cut to {list(out)} "
                          f"(only a prefix of one dimension is nested)")


def _expect(name: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if found != expected:
        raise CheckpointError(
            f"tensor {name!r} has shape {list(found)}, expected {list(expected)} from config.json "
            f"(intermediate_size / heads / hidden_size); the config does not describe these weights"
        )


# ---- streaming extraction ------------------------------------------------------------------


@dataclass
class SliceResult:
    """What `slice_checkpoint` wrote. For `tiers=[...]`, `parts` holds one result per tier and
    `manifest` the manifest's path; the byte counts are then totals."""

    path: Path
    config: Config | None
    widths: list[int]
    keep_layers: list[int]
    explanation: str
    files: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    parts: dict[int, SliceResult] | None = None
    manifest: Path | None = None

    @property
    def tier(self) -> int | None:
        return self.config.stored_tier if self.config is not None else None

    def summary(self) -> str:
        if self.parts is not None:
            lines = [f"wrote {len(self.parts)} tiers to {self.path} with {self.manifest}"]
            lines += [f"  {p.summary()}" for p in self.parts.values()]
            return "\n".join(lines)
        assert self.config is not None
        t = self.tier
        what = f"tier {t} (width {self.widths[0]})" if t is not None else f"widths {self.widths}"
        what += f", {describe_heads(self.config.layer_kv_heads)}"
        return (
            f"{self.path}: {what}, {len(self.widths)} layers, "
            f"{format_count(non_embedding_parameters(self.config))} non-embedding parameters; "
            f"{len(self.files)} files, read {self.bytes_read / 1e6:.1f} MB, wrote "
            f"{self.bytes_written / 1e6:.1f} MB in {self.seconds:.2f} s"
        )


def _open_source(src: str | os.PathLike | Source, revision: str | None,
                 request: WidthRequest) -> tuple[Source, Checkpoint]:
    """The resolved source (of a multi-tier one, the folder holding the widest output width
    `request` asks for; tokenizer and companions fetched too) and its validated headers."""
    source = resolve_source(src, request=request, revision=revision, companions=True)
    return source, open_checked(source, "slicing")


def slice_source(src: str | os.PathLike | Source, revision: str | None = None, *,
                 request: WidthRequest | None = None, tiers: Sequence[int] | None = None,
                 companions: Sequence[str] = COMPANION_FILES) -> Source:
    """The source a slice of `request` (or of `tiers`) reads (of a multi-tier repo: the tier
    folder holding the widest width asked for), with the `companions` a slice carries fetched.
    `slice_checkpoint` takes the result as it is, so a caller that must know the family first
    resolves SRC once."""
    if tiers:
        request = WidthRequest(tier=min(int(t) for t in tiers))
    return resolve_source(src, request=request or WidthRequest(), revision=revision,
                          companions=tuple(companions))


def _file_order(ck: Checkpoint) -> list[tuple[str, str, tuple[int, ...]]]:
    """Source tensors in (shard, offset) order: the writer's order is then a sequential read."""
    order = {s: i for i, s in enumerate(ck.layout.shards)}
    infos = sorted(ck.tensors.values(), key=lambda t: (order[ck.where[t.name]], t.start))
    return [(t.name, t.dtype, t.shape) for t in infos]


def slice_checkpoint(
    src: str | os.PathLike | Source,
    out: str | os.PathLike,
    *,
    tier: int | None = None,
    widths: int | Sequence[int] | None = None,
    layer_tiers: Sequence[int] | None = None,
    budget: int | str | None = None,
    skip_layers: Sequence[int] | None = None,
    tiers: Sequence[int] | None = None,
    kv_heads: int | None = None,
    layer_kv_heads: Sequence[int] | None = None,
    search_heads: bool | None = None,
    max_shard_size: int | str = "5GB",
    revision: str | None = None,
    log: Any = None,
) -> SliceResult:
    """Write a smaller checkpoint cut from `src` into `out` (see the module docstring).

    Choose at most one of `tier`, `widths` (int or one per layer), `layer_tiers`, `budget` (a
    non-embedding parameter count; the choice is explained in the result and logged), or
    `tiers` (several uniform tiers: OUT/tier-T/ each, plus OUT/matformer_manifest.json).
    `skip_layers` drops source layers and renumbers the rest. `kv_heads` / `layer_kv_heads` cut
    the attention heads (combinable with any width request; with `tiers`, every tier gets them).
    `budget` searches the heads too when `search_heads` (default: when the source's heads nest —
    its train_config.json says nest_heads, or its heads are already cut below the base) and no
    heads are given. `log` (e.g. `print`) receives progress lines. Raises TierError for widths or
    heads the source does not hold."""
    say = log or (lambda *_: None)
    if tiers is not None:
        others = [n for n, v in (("tier", tier), ("widths", widths), ("layer_tiers", layer_tiers),
                                 ("budget", budget)) if v is not None]
        if others:
            raise ConfigError(f"tiers= writes several uniform tiers; drop {', '.join(others)}")
        heads = WidthRequest(kv_heads=kv_heads, layer_kv_heads=layer_kv_heads)
        return _slice_many(src, out, list(tiers), skip_layers=skip_layers, heads=heads,
                           max_shard_size=max_shard_size, revision=revision, say=say)
    t0 = time.perf_counter()
    request = _request(tier, widths, layer_tiers, budget, kv_heads, layer_kv_heads)
    source, ck = _open_source(src, revision, request)
    folder = source.folder
    out_path = Path(out)
    check_output_folder(out_path, protect=source.inputs(), what="slice")
    if search_heads is None:
        search_heads = heads_nest(source)
    plan = _plan(source.config, request, budget, skip_layers, search_heads)
    say(plan.explanation)
    jobs = {j.out_name: j for j in map_tensors(plan, _file_order(ck))}
    extra = {name: folder / name for name in COMPANION_FILES if (folder / name).is_file()}
    reads = {n: ReadJob.prefix(j.src_name, j.src_shape, j.out_shape) for n, j in jobs.items()}
    with TensorReader(ck) as reader:
        write_checkpoint(
            out_path, plan.config, [(j.out_name, j.dtype, j.out_shape) for j in jobs.values()],
            lambda name: reader.read(reads[name]),
            max_shard_size=max_shard_size, extra_files=extra,
        )
    files = _written_files(out_path)
    nbytes = sum((out_path / f).stat().st_size for f in files)
    return SliceResult(out_path, plan.config, plan.widths, plan.keep_layers, plan.explanation,
                       files, reader.bytes_read, nbytes, time.perf_counter() - t0)


def heads_nest(source: Source) -> bool:
    """Whether the source's heads are nested (trained so, or already cut): its train_config.json
    (a companion file every slice carries) says nest_heads, or it stores fewer KV heads than its
    base. Only then does `--budget` trade heads against FFN width."""
    cfg = source.config
    if any(g < cfg.base_kv_heads for g in cfg.layer_kv_heads):
        return True
    path = source.folder / "train_config.json"
    try:
        settings = read_json(path) if os.path.lexists(path) else {}
    except MatFormerError:  # regular files only: a FIFO is refused, never waited on
        return False
    return isinstance(settings, dict) and bool(settings.get("nest_heads", False))


def _written_files(out: Path) -> list[str]:
    """The files of the written checkpoint folder."""
    return sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))


def _slice_many(src: str | os.PathLike | Source, out: str | os.PathLike, tiers: list[int], *,
                skip_layers: Sequence[int] | None, heads: WidthRequest,
                max_shard_size: int | str, revision: str | None, say: Any) -> SliceResult:
    """`tiers=`: every tier (each with the KV `heads` request) into OUT/tier-T, and a manifest."""
    t0 = time.perf_counter()
    if not tiers:
        raise ConfigError("tiers: give at least one tier")
    if len(set(tiers)) != len(tiers):
        raise ConfigError(f"tiers: {tiers} names a tier twice")
    root = Path(out)
    if (root / "config.json").exists():
        raise CheckpointError(
            f"{root}: holds a checkpoint (config.json); a multi-tier repo needs its own folder"
        )
    # Validate every tier before writing anything (a multi-tier source: the folder holding all).
    source, _ = _open_source(src, revision, WidthRequest(tier=min(tiers)))
    check_output_folder(root, protect=source.inputs(), what="multi-tier repo")
    for t in tiers:
        _plan(source.config, WidthRequest(tier=t, **heads.keywords()), None, skip_layers, False)
    root.mkdir(parents=True, exist_ok=True)
    parts: dict[int, SliceResult] = {}
    for t in sorted(tiers):
        say(f"tier {t} -> {root / f'tier-{t}'}")
        parts[t] = slice_checkpoint(source, root / f"tier-{t}", tier=t, skip_layers=skip_layers,
                                    **heads.keywords(), max_shard_size=max_shard_size)
    path = write_manifest(root, source.config.base, {t: f"tier-{t}" for t in parts},
                          {t: parts[t].widths[0] for t in parts})
    return SliceResult(
        root, None, [], [], "\n".join(p.explanation for p in parts.values()),
        [MANIFEST_NAME] + [f"tier-{t}/{f}" for t, p in parts.items() for f in p.files],
        sum(p.bytes_read for p in parts.values()), sum(p.bytes_written for p in parts.values()),
        time.perf_counter() - t0, parts=parts, manifest=path,
    )
