"""Planning a Gemma 3n slice: which source layers are kept, each one's FFN width, the rules that
keep the result loadable, and the output config.json.

Rules (transformers' Gemma3nTextConfig semantics):
- widths are prefixes of each layer's stored FFN (MatFormer nesting); a width above what the
  layer stores is a `TierError`. `layer_tiers` / `tier` count against each layer's stored width
  (tier t = stored >> t), so tier 1 of E4B (16_384) is E2B's 8_192;
- a skipped layer must not be one the kept KV-shared layers read their keys and values from (the
  last layer of their attention type before the shared range): that is a `ConfigError`;
- the output keeps `num_kv_shared_layers` = the kept layers of the shared range, and
  `layer_types`, `activation_sparsity_pattern` and `intermediate_size` of the kept layers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matformer.errors import ConfigError, TierError
from matformer.slicing.gemma3n.config import Gemma3nConfig
from matformer.slicing.gemma3n.slicing_configs import read_slicing_config


@dataclass
class Gemma3nPlan:
    source: Gemma3nConfig
    keep: list[int]  # source layer indices, in order
    widths: list[int]  # FFN width of each kept layer
    config: dict[str, Any]  # the output config.json
    explanation: str

    @property
    def num_kv_shared(self) -> int:
        return sum(1 for i in self.keep if i >= self.source.first_shared)


def keep_layers(source: Gemma3nConfig, skip_layers: Sequence[int] | None) -> list[int]:
    """Kept source layers after `skip_layers`, checked against the KV-sharing rule."""
    n = source.num_layers
    skip = [int(i) for i in skip_layers or []]
    bad = [i for i in skip if not 0 <= i < n]
    if bad:
        raise ConfigError(f"skip_layers: layer {bad[0]} does not exist (the source has layers "
                          f"0-{n - 1})")
    if len(set(skip)) != len(skip):
        raise ConfigError(f"skip_layers: {skip} names a layer twice")
    keep = [i for i in range(n) if i not in set(skip)]
    if not keep:
        raise ConfigError(f"skip_layers: {skip} drops all {n} layers; keep at least one")
    types = source.layer_types
    for t, store in sorted(source.kv_stores().items()):
        readers = [i for i in keep if i >= source.first_shared and types[i] == t]
        if store in skip and readers:
            raise ConfigError(
                f"skip_layers: layer {store} is where the KV-shared {t} layers {readers} read "
                f"their keys and values (num_kv_shared_layers={source.num_kv_shared}); keep it, "
                f"or skip those layers too"
            )
    return keep


def _per_layer(values: Sequence[int], keep: list[int], n_src: int, what: str) -> list[int]:
    """A per-layer list given for every source layer or only the kept ones -> the kept ones."""
    vals = [int(v) for v in values]
    if len(vals) == 1:
        return vals * len(keep)
    if len(vals) == n_src and n_src != len(keep):
        return [vals[i] for i in keep]
    if len(vals) != len(keep):
        need = f"{len(keep)}" + (f" (the kept layers) or {n_src} (all source layers)"
                                 if n_src != len(keep) else "")
        raise TierError(f"{what} has {len(vals)} entries; the model needs one, or {need}")
    return vals


def _tier_widths(stored: list[int], tiers: list[int], keep: list[int]) -> list[int]:
    out = []
    for i, t in zip(keep, tiers, strict=True):
        # the size first: `1 << 10**12` would allocate a 125 GB integer before any check
        if t < 0 or t >= stored[i].bit_length() or stored[i] % (1 << t):
            raise TierError(f"layer_tiers: tier {t} of layer {i} (stored width {stored[i]}) is not "
                            f"a whole width stored >> tier")
        out.append(stored[i] >> t)
    return out


def _check_widths(source: Gemma3nConfig, keep: list[int], widths: list[int]) -> None:
    stored = source.widths
    for j, (i, w) in enumerate(zip(keep, widths, strict=True)):
        if w <= 0:
            raise TierError(f"width {w} of output layer {j} (source layer {i}) must be positive")
        if w > stored[i]:
            raise TierError(
                f"width {w} for output layer {j} (source layer {i}) is above the {stored[i]} that "
                f"{source.path} stores for it; a slice keeps a prefix of the stored FFN"
            )


def plan_gemma3n(
    source: Gemma3nConfig,
    *,
    tier: int | None = None,
    widths: int | Sequence[int] | None = None,
    layer_tiers: Sequence[int] | None = None,
    skip_layers: Sequence[int] | None = None,
    config_csv: str | None = None,
    config_name: str | None = None,
) -> Gemma3nPlan:
    """Validate a request against the source config and return the output plan."""
    if (config_csv is None) != (config_name is None):
        raise ConfigError("--config-csv and --config-name go together: the file and the row")
    given = [n for n, v in (("tier", tier), ("widths", widths), ("layer_tiers", layer_tiers),
                            ("config_csv", config_csv)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of tier, widths, layer_tiers, config_csv (got {', '.join(given)})")
    how = ""
    if config_csv is not None:
        if skip_layers:
            raise ConfigError("the slicing config names its own skipped layers; drop --skip-layers")
        row = read_slicing_config(config_csv, config_name or "")
        skip_layers, widths = row.skip_layers, row.widths
        how = (f"configuration {row.name!r} of {config_csv}"
               + (f" (published: {row.effective_params_b}B effective)" if row.effective_params_b else ""))
    keep = keep_layers(source, skip_layers)
    stored, n_src = source.widths, source.num_layers
    if tier is not None:
        out = _tier_widths(stored, [tier] * len(keep), keep)
    elif layer_tiers is not None:
        out = _tier_widths(stored, _per_layer(layer_tiers, keep, n_src, "layer_tiers"), keep)
    elif widths is not None:
        if config_csv is not None and len(widths) != len(keep):  # type: ignore[arg-type]
            raise ConfigError(f"{how}: lists {len(widths)} widths for {len(keep)} kept layers")  # type: ignore[arg-type]
        out = _per_layer([widths] if isinstance(widths, int) else widths, keep, n_src, "widths")
    else:
        out = [stored[i] for i in keep]
    _check_widths(source, keep, out)
    shared = sum(1 for i in keep if i >= source.first_shared)
    text = source.text
    config = source.with_text(
        num_hidden_layers=len(keep),
        intermediate_size=out,
        layer_types=[text["layer_types"][i] for i in keep],
        activation_sparsity_pattern=[text["activation_sparsity_pattern"][i] for i in keep],
        num_kv_shared_layers=shared,
    )
    skipped = sorted(set(range(n_src)) - set(keep))
    explanation = (f"{how + ': ' if how else ''}{len(keep)} of {n_src} layers"
                   + (f" (skipped {skipped}, the rest renumbered)" if skipped else "")
                   + f", FFN widths {describe_runs(out)}, num_kv_shared_layers {source.num_kv_shared}"
                   + f" -> {shared}")
    return Gemma3nPlan(source, keep, out, config, explanation)


def describe_runs(values: Sequence[int]) -> str:
    """[8192, 8192, 16384] -> '8192 x2, 16384'."""
    parts: list[str] = []
    k = 0
    while k < len(values):
        m = k
        while m + 1 < len(values) and values[m + 1] == values[k]:
            m += 1
        parts.append(f"{values[k]}" + (f" x{m - k + 1}" if m > k else ""))
        k = m + 1
    return ", ".join(parts)
