"""`MatFormerConfig`: the model config, which *is* the checkpoint's `config.json`.

A uniform-width config is a valid transformers Llama config (`model_type: llama`), plus the two
MatFormer keys (see docs/FORMAT.md, rules from the checkpoint spec §2):

- `intermediate_size`: the FFN width actually stored, an int or one int per layer;
- `matformer_base_intermediate_size`: the full (tier-0) width B the weights were cut from;
- `matformer_tier`: tier of the stored tensors (B >> t == stored width), derived from the sizes,
  never from the width the model happens to compute at. None for widths that are no tier.
- heads (the second elastic axis): `num_key_value_heads` / `num_attention_heads` are the heads
  stored (an int, or one per layer), `matformer_base_num_key_value_heads` the G they were cut
  from (always written), `head_dim` is always written (it no longer follows from hidden_size once
  heads are cut). The query heads per KV head (r) are the same in every layer.

Unknown keys are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matformer.errors import ConfigError
from matformer.io.files import read_json
from matformer.models.lm.numerics import check_numerics_keys
from matformer.tiers import uniform_tier, width_of

_DTYPES = ("float32", "float16", "bfloat16")

# Keys we own: read from and written to config.json by name. Everything else goes to `extra`.
_KNOWN = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "initializer_range",
    "matformer_base_intermediate_size",
    "matformer_tier",
    "matformer_base_num_key_value_heads",
}
# Keys that we derive or rewrite on every write (not preserved from `extra`).
_REWRITTEN = {"model_type", "architectures", "rope_parameters", "dtype", "transformers_version"}


@dataclass
class MatFormerConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int | list[int] = 11008
    """FFN width stored in the weights: one int, or one int per layer (Mix'n'Match)."""
    num_hidden_layers: int = 32
    num_attention_heads: int | list[int] = 32
    """Query heads stored: one int, or one per layer (heads cut per layer)."""
    num_key_value_heads: int | list[int] | None = None
    """KV heads stored (grouped-query attention): one int or one per layer; None means
    num_attention_heads (plain multi-head attention)."""
    head_dim: int | None = None
    """None means hidden_size // num_attention_heads (of an uncut model)."""
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    initializer_range: float = 0.02
    matformer_base_intermediate_size: int | None = None
    """Full (tier-0) width B. None: B = the stored width (a dense model is tier 0)."""
    matformer_tier: int | None = None
    """Tier of the stored weights as read from a file; recomputed from the sizes on write."""
    matformer_base_num_key_value_heads: int | None = None
    """Full number of KV heads G the heads were cut from. None: G = the stored count."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Unknown config.json keys, kept for the round trip."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = copy.copy(self.num_attention_heads)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            _positive_int(key, getattr(self, key))
        if self.num_hidden_layers > MAX_LAYERS:
            raise ConfigError(f"num_hidden_layers={self.num_hidden_layers} is over the limit of "
                              f"{MAX_LAYERS} layers; the config is damaged or not a model's")
        self._check_scalars()
        self.num_attention_heads = self._per_layer("num_attention_heads")
        self.num_key_value_heads = self._per_layer("num_key_value_heads")
        if self.head_dim is None:
            if not isinstance(self.num_attention_heads, int):
                raise ConfigError("num_attention_heads is a per-layer list; set head_dim explicitly")
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; change one of them or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        self._check_heads()
        if isinstance(self.intermediate_size, (list, tuple)):
            sizes = list(self.intermediate_size)
            if len(sizes) != self.num_hidden_layers:
                raise ConfigError(
                    f"intermediate_size has {len(sizes)} entries but num_hidden_layers="
                    f"{self.num_hidden_layers}; a per-layer list needs one width per layer"
                )
            for i, s in enumerate(sizes):
                _positive_int(f"intermediate_size[{i}]", s)
            self.intermediate_size = sizes
            if all(s == sizes[0] for s in sizes) and len(sizes) > 0:
                # A uniform list is an int: keeps the config loadable by transformers.
                self.intermediate_size = sizes[0]
        else:
            _positive_int("intermediate_size", self.intermediate_size)
        if self.matformer_base_intermediate_size is None:
            self.matformer_base_intermediate_size = max(self.layer_widths)
        _positive_int("matformer_base_intermediate_size", self.matformer_base_intermediate_size)
        base = self.matformer_base_intermediate_size
        for i, w in enumerate(self.layer_widths):
            if w > base:
                raise ConfigError(
                    f"intermediate_size of layer {i} is {w}, wider than "
                    f"matformer_base_intermediate_size={base}"
                )
        if self.matformer_tier is not None:
            _nonneg_int("matformer_tier", self.matformer_tier)
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        self.rope_theta = float(self.rope_theta)
        if self.torch_dtype not in _DTYPES:
            raise ConfigError(f"torch_dtype={_show(self.torch_dtype)} is not one of {_DTYPES}")

    def _check_scalars(self) -> None:
        """Types and ranges of the non-size keys: a wrong type is refused, never coerced (a
        string "false" is true in Python; Infinity is no epsilon)."""
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got "
                              f"{_show(self.tie_word_embeddings)}")
        for key in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ConfigError(f"{key} must be a positive finite number, got {_show(v)}")
        v = self.initializer_range
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ConfigError(f"initializer_range must be a non-negative finite number, got {_show(v)}")
        for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
            v = getattr(self, key)
            ids = v if key == "eos_token_id" and isinstance(v, list) else [v]
            if v is None:
                continue
            if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < (1 << 40)
                              for i in ids):
                what = "a token id or a list of them" if key == "eos_token_id" else "a token id"
                raise ConfigError(f"{key} must be {what} (a non-negative integer) or null, got "
                                  f"{_show(v)}")

    def _per_layer(self, key: str) -> int | list[int]:
        """A head count as stored: an int, or a per-layer list (a uniform list becomes an int, so
        the config stays loadable by transformers)."""
        v = getattr(self, key)
        if isinstance(v, (list, tuple)):
            vals = list(v)
            if len(vals) != self.num_hidden_layers:
                raise ConfigError(f"{key} has {len(vals)} entries but num_hidden_layers="
                                  f"{self.num_hidden_layers}; a per-layer list needs one per layer")
            for i, x in enumerate(vals):
                _positive_int(f"{key}[{i}]", x)
            return vals[0] if all(x == vals[0] for x in vals) else vals
        _positive_int(key, v)
        return v

    def _check_heads(self) -> None:
        heads, kv = self.layer_heads, self.layer_kv_heads
        ratios = set()
        for i, (nh, g) in enumerate(zip(heads, kv, strict=True)):
            if nh % g:
                raise ConfigError(f"num_attention_heads={nh} is not divisible by "
                                  f"num_key_value_heads={g}" + (f" in layer {i}" if
                                                                 self._varies() else ""))
            ratios.add(nh // g)
        if len(ratios) > 1:
            raise ConfigError(f"num_attention_heads / num_key_value_heads must be the same in every "
                              f"layer (query heads per KV head), got {sorted(ratios)}")
        if self.matformer_base_num_key_value_heads is None:
            self.matformer_base_num_key_value_heads = max(kv)
        _positive_int("matformer_base_num_key_value_heads", self.matformer_base_num_key_value_heads)
        for i, g in enumerate(kv):
            if g > self.matformer_base_num_key_value_heads:
                raise ConfigError(f"num_key_value_heads of layer {i} is {g}, more than "
                                  f"matformer_base_num_key_value_heads="
                                  f"{self.matformer_base_num_key_value_heads}")

    def _varies(self) -> bool:
        return isinstance(self.num_key_value_heads, list)

    # ---- derived -------------------------------------------------------------------------

    @property
    def layer_kv_heads(self) -> list[int]:
        """Stored KV heads of each layer."""
        v = self.num_key_value_heads
        assert v is not None
        return list(v) if isinstance(v, list) else [v] * self.num_hidden_layers

    @property
    def layer_heads(self) -> list[int]:
        """Stored query heads of each layer."""
        v = self.num_attention_heads
        return list(v) if isinstance(v, list) else [v] * self.num_hidden_layers

    @property
    def group_size(self) -> int:
        """Query heads per KV head (r), the same in every layer."""
        return self.layer_heads[0] // self.layer_kv_heads[0]

    @property
    def base_kv_heads(self) -> int:
        """G: the full number of KV heads (matformer_base_num_key_value_heads)."""
        assert self.matformer_base_num_key_value_heads is not None
        return self.matformer_base_num_key_value_heads

    def with_kv_heads(self, kv_heads: int | list[int]) -> MatFormerConfig:
        """A copy describing the same model storing `kv_heads` KV heads (int or per layer; the
        query heads follow: r per KV head); same base G and head_dim."""
        new = copy.deepcopy(self)
        r = self.group_size
        new.num_key_value_heads = kv_heads if isinstance(kv_heads, int) else list(kv_heads)
        new.num_attention_heads = (kv_heads * r if isinstance(kv_heads, int)
                                   else [g * r for g in kv_heads])
        new.__post_init__()
        return new

    @property
    def layer_widths(self) -> list[int]:
        """Stored FFN width of each layer."""
        if isinstance(self.intermediate_size, list):
            return list(self.intermediate_size)
        return [self.intermediate_size] * self.num_hidden_layers

    @property
    def base(self) -> int:
        assert self.matformer_base_intermediate_size is not None
        return self.matformer_base_intermediate_size

    @property
    def stored_tier(self) -> int | None:
        """Tier of the stored widths, computed from the sizes (the rule of the spec §2)."""
        return uniform_tier(self.base, self.layer_widths)

    def check_tier_label(self, source: str = "config.json") -> None:
        """A `matformer_tier` read from a file must agree with the stored sizes."""
        if self.matformer_tier is None:
            return
        actual = self.stored_tier
        if actual != self.matformer_tier:
            what = f"tier {actual}" if actual is not None else "no uniform tier"
            raise ConfigError(
                f"{source}: matformer_tier={self.matformer_tier} disagrees with the stored sizes "
                f"(intermediate_size={self.intermediate_size}, matformer_base_intermediate_size="
                f"{self.base}: that is {what}); fix or remove matformer_tier"
            )

    def check_tier(self, tier: int) -> int:
        """Width of `tier` for this base, or a ConfigError naming the key."""
        try:
            return width_of(self.base, tier)
        except ValueError as e:
            raise ConfigError(f"matformer_base_intermediate_size: {e}") from None

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.torch_dtype)

    def with_widths(self, widths: int | list[int]) -> MatFormerConfig:
        """A copy describing the same model storing `widths` (same base)."""
        new = copy.deepcopy(self)
        new.intermediate_size = widths
        new.matformer_tier = None
        new.__post_init__()
        new.matformer_tier = new.stored_tier
        return new

    # ---- config.json ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> MatFormerConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        check_numerics_keys(d, source)  # every key that changes the logits: ours, or refused
        d = dict(d)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        rope_params = d.pop("rope_parameters", None)
        dtype = d.pop("dtype", None)
        for k, v in d.items():
            if k in _KNOWN:
                kwargs[k] = v
            elif k not in _REWRITTEN:
                extra[k] = v
        if isinstance(rope_params, dict):
            rtype = rope_params.get("rope_type", rope_params.get("type", "default"))
            if rtype != "default":
                raise ConfigError(
                    f"{source}: rope_parameters.rope_type={rtype!r} is not supported "
                    f"(only 'default' rotary embeddings)"
                )
            if "rope_theta" in rope_params:
                kwargs.setdefault("rope_theta", rope_params["rope_theta"])
        scaling = extra.get("rope_scaling")
        if scaling:
            raise ConfigError(f"{source}: rope_scaling={scaling!r} is not supported")
        if dtype is not None and "torch_dtype" not in kwargs:
            kwargs["torch_dtype"] = dtype
        if kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)
        elif isinstance(kwargs["torch_dtype"], str):
            kwargs["torch_dtype"] = kwargs["torch_dtype"].removeprefix("torch.")
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if k not in kwargs:
                raise ConfigError(f"{source}: required key {k!r} is missing")
        if "intermediate_size" not in kwargs:
            raise ConfigError(f"{source}: required key 'intermediate_size' is missing")
        try:
            cfg = cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # wrong types that dataclass can't even hold
            raise ConfigError(f"{source}: {e}") from None
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The config.json object. `matformer_tier` is recomputed from the stored sizes."""
        d: dict[str, Any] = dict(self.extra)
        uniform = isinstance(self.intermediate_size, int) and not self._varies()
        d["model_type"] = "llama"
        d["architectures"] = ["LlamaForCausalLM"] if uniform else ["MatFormerForCausalLM"]
        for f in dataclasses.fields(self):
            if f.name in ("extra", "matformer_tier"):
                continue
            d[f.name] = copy.deepcopy(getattr(self, f.name))
        d["matformer_tier"] = self.stored_tier
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d["dtype"] = self.torch_dtype
        d.setdefault("hidden_act", "silu")
        d.setdefault("attention_bias", False)
        d.setdefault("mlp_bias", False)
        return dict(sorted(d.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MatFormerConfig:
        """A config.json (a regular file, strict JSON; see io.files.read_json)."""
        p = Path(path)
        return cls.from_dict(read_json(p, error=ConfigError), source=str(p))

    # ---- presets ---------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MatFormerConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


MAX_LAYERS = 100_000
"""More layers than any model has: a config asking for more is damaged (nothing proportional to
num_hidden_layers is allocated before this check)."""
MAX_SIZE = 1 << 40
"""Bound on any size or count in a config (widths, vocabulary, heads, positions)."""


def _show(v: Any) -> str:
    """repr of a config value for a message, short even for huge integers or long strings."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _positive_int(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < MAX_SIZE:
        raise ConfigError(f"{key} must be a positive integer below 2^40, got {_show(v)}")


def _nonneg_int(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_SIZE:
        raise ConfigError(f"{key} must be a non-negative integer below 2^40, got {_show(v)}")


# Named sizes. `debug` is what tests and examples use; the rest are for real runs. Vocab sizes are
# defaults; training replaces them with the trained tokenizer's size.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "base": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
    "850m": dict(vocab_size=32000, hidden_size=1536, intermediate_size=6144,
                 num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                 max_position_embeddings=2048),
    # FFN-heavy, shaped like the models MatFormer is used for (Gemma 3n: FFN = 8x hidden) with the
    # embeddings a small share of the parameters, so the nested FFN widths differ in what they
    # can do. Parameter splits (shapes.parameter_counts, untied embeddings) are in docs/RESULTS.md.
    "ffn8-micro": dict(vocab_size=512, hidden_size=64, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "ffn8-tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "ffn8-small": dict(vocab_size=8192, hidden_size=384, intermediate_size=3072,
                       num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                       max_position_embeddings=1024),
}


def perplexity(loss: float) -> float:
    """e^loss (losses are natural-log cross-entropies)."""
    return math.exp(min(loss, 700.0))
