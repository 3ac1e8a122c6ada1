"""Rotary embeddings as transformers 5 computes them: `default`, `linear`, `dynamic`, `yarn` and
`llama3` (modeling_rope_utils.py), for every family built on the Llama block.

A config carries them as `rope_parameters` (transformers >= 5) or as the older `rope_scaling`
beside a top-level `rope_theta`; both are read into one `RopeSpec` (torch-free: `matformer info`
reads configs without torch), which `inv_freq` turns into the inverse frequencies and the factor
cos/sin are multiplied by (yarn's `attention_factor`; 1 for the others). Keys a type does not
read, other types (`longrope`, `proportional`, ...) and a `partial_rotary_factor` below 1 (the
Llama-block classes of transformers rotate the whole head: their `apply_rotary_pos_emb` has no
pass-through part) are one-line refusals naming the key.

`dynamic` (NTK) is computed per forward from the longest position in it, as transformers'
`dynamic_rope_update` does while positions grow (its cache then resets below
`max_position_embeddings`, which is where dynamic equals default anyway). No table is sized to
`max_position_embeddings`: cos/sin are computed for the positions of each call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from matformer.errors import ConfigError

TYPES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "yarn": (frozenset({"factor"}),
             frozenset({"original_max_position_embeddings", "attention_factor", "beta_fast",
                        "beta_slow", "mscale", "mscale_all_dim", "truncate"})),
    "llama3": (frozenset({"factor", "low_freq_factor", "high_freq_factor"}),
               frozenset({"original_max_position_embeddings"})),
}
"""rope_type -> (required keys, optional keys) besides rope_type/type, rope_theta and
partial_rotary_factor (1.0 only), as transformers' `_validate_<type>_rope_parameters` reads them."""


@dataclass(frozen=True)
class RopeSpec:
    """One rotary embedding: its type, base and the type's parameters (transformers' names)."""

    rope_type: str = "default"
    theta: float = 10000.0
    params: dict[str, Any] = field(default_factory=dict)
    """The type's parameters (`factor`, `original_max_position_embeddings`, ...), as given."""

    @property
    def scaled(self) -> bool:
        return self.rope_type != "default"

    def to_dict(self) -> dict[str, Any]:
        """transformers' `rope_parameters` object."""
        return {"rope_type": self.rope_type, "rope_theta": self.theta, **self.params}


def _number(where: str, key: str, v: Any, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
            positive and v <= 0):
        raise ConfigError(f"{where}.{key}={v!r} must be a {'positive ' if positive else ''}"
                          f"finite number")
    return v


def read_rope(d: dict[str, Any], source: str = "config.json") -> RopeSpec:
    """The rotary embedding a config.json object describes (`rope_parameters`, else
    `rope_scaling` + `rope_theta`), with transformers' defaults filled in; a type or key it does
    not compute is a one-line ConfigError naming it."""
    params = d.get("rope_parameters")
    key = "rope_parameters"
    if not params:
        params, key = d.get("rope_scaling"), "rope_scaling"
    where = f"{source}: {key}"
    if params is None or params == {}:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}={params!r} must be an object or null")
    params = dict(params)
    kind = params.pop("rope_type", None)
    legacy = params.pop("type", None)
    kind = kind if kind is not None else (legacy if legacy is not None else "default")
    if kind not in TYPES:
        raise ConfigError(f"{where}.rope_type={kind!r} is not supported (implemented: "
                          f"{', '.join(TYPES)}); matformer would compute different logits than "
                          f"transformers")
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    _number(where, "rope_theta", theta)
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is not None and partial != 1 and partial != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor={partial!r} is not supported (the "
                          f"Llama-block classes of transformers rotate whole heads)")
    required, optional = TYPES[kind]
    unknown = sorted(set(params) - required - optional)
    if unknown:
        raise ConfigError(f"{where}: keys {unknown} are not read by rope_type {kind!r}; "
                          f"matformer would compute different logits than transformers")
    missing = sorted(k for k in required if params.get(k) is None and not (
        kind == "yarn" and k == "factor"))
    if missing:
        raise ConfigError(f"{where}: rope_type {kind!r} needs {missing}")
    for k, v in params.items():
        if k == "truncate":
            if not isinstance(v, bool):
                raise ConfigError(f"{where}.truncate={v!r} must be true or false")
        elif v is not None:
            _number(where, k, v, positive=k not in ("beta_fast", "beta_slow"))
    if kind in ("yarn", "llama3"):
        top = d.get("original_max_position_embeddings")
        if top is not None:  # transformers: a top-level key wins over the nested one
            params["original_max_position_embeddings"] = top
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    if kind == "llama3" and params["low_freq_factor"] == params["high_freq_factor"]:
        raise ConfigError(f"{where}: low_freq_factor equals high_freq_factor (a division by zero)")
    return RopeSpec(kind, float(theta), params)


# ---- the numbers (torch) ----------------------------------------------------------------------


def _default_inv_freq(base: Any, dim: int, device: Any) -> Any:
    import torch

    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device,
                                                                       dtype=torch.float) / dim))


def inv_freq(spec: RopeSpec, dim: int, max_positions: int, device: Any = None,
             seq_len: Any = None) -> tuple[Any, float]:
    """(inverse frequencies (dim/2,), attention factor) exactly as transformers'
    `ROPE_INIT_FUNCTIONS[spec.rope_type]` computes them for head size `dim`. `seq_len` (an int
    or a 0-d tensor) matters to `dynamic` only: None is transformers' value at init."""
    import torch

    base, p = spec.theta, spec.params
    kind = spec.rope_type
    if kind == "default":
        return _default_inv_freq(base, dim, device), 1.0
    if kind == "linear":
        inv = _default_inv_freq(base, dim, device)
        inv /= p["factor"]
        return inv, 1.0
    if kind == "dynamic":
        factor = p["factor"]
        if seq_len is None:
            seq_len = max_positions
        elif isinstance(seq_len, torch.Tensor):
            seq_len = torch.maximum(seq_len, torch.tensor(max_positions, dtype=seq_len.dtype,
                                                          device=seq_len.device))
        else:
            seq_len = max(seq_len, max_positions)
        base = base * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim, device), 1.0
    if kind == "llama3":
        return _llama3(spec, dim, device), 1.0
    if kind == "yarn":
        return _yarn(spec, dim, max_positions, device)
    raise ConfigError(f"rope_type {kind!r} is not supported")  # read_rope refused it already


def _llama3(spec: RopeSpec, dim: int, device: Any) -> Any:
    import torch

    p = spec.params
    inv = _default_inv_freq(spec.theta, dim, device)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    inv_llama = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_llama)


def _yarn_mscale(scale: float = 1, mscale: float = 1) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn(spec: RopeSpec, dim: int, max_positions: int, device: Any) -> tuple[Any, float]:
    import torch

    p, base = spec.params, spec.theta
    factor = p.get("factor")
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    original = p["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor,
                                                                                mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp.to(device=device, dtype=torch.float)
    inv = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv, attention_factor


def llama3_factors(spec: RopeSpec, dim: int) -> list[float]:
    """llama.cpp's `rope_freqs` tensor for a `llama3` spec (its converter's
    `LlamaModel.generate_extra_tensors`): per frequency, what llama.cpp divides it by."""
    p = spec.params
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / (spec.theta ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(float(factor))
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out
