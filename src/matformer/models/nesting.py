"""What every nested model family shares: its config base and its width setting.

- `NestedConfig`: the base of every family's config (`MatFormerConfig`, `MatViTConfig`, ...).
  The nested keys of config.json (stored `intermediate_size` and heads, one int or one per layer;
  `matformer_base_intermediate_size`, `matformer_base_num_key_value_heads`, `matformer_tier`;
  `torch_dtype`; unknown keys kept in `extra`), the checks on them and the config.json round trip
  are written once here; a family's config says which keys it owns and adds its own checks
  through a few hooks. Torch-free, and it opens no file (`io.source.read_config_file` reads one).
- `WidthSetting`: the model mixin. A model names, per layer, the module that holds its FFN width
  (`width`, `stored_width`) and the one that holds its KV heads (`kv_heads`, `stored_kv_heads`);
  reading, validating, setting and temporarily changing the setting is then written once here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from matformer.errors import ConfigError
from matformer.tiers import Setting, WidthRequest, uniform_kv_heads, uniform_tier, width_of

DTYPES = ("float32", "float16", "bfloat16")
"""The floating-point storage types a nested checkpoint may declare."""
MAX_SIZE = 1 << 40
"""Bound on any size or count in a config (widths, vocabulary, heads, positions, pixels)."""
NESTED_KEYS = frozenset({"intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "head_dim", "torch_dtype", "initializer_range",
                         "matformer_base_intermediate_size", "matformer_tier",
                         "matformer_base_num_key_value_heads"})
"""config.json keys every family owns (a family adds its own in `KNOWN`)."""
REWRITTEN = frozenset({"model_type", "architectures", "dtype", "transformers_version"})
"""Keys derived or rewritten on every write, never carried over from `extra`."""


def show_value(v: Any) -> str:
    """repr of a config value for a message, short even for huge integers or long strings."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_positive_int(key: str, v: Any) -> None:
    """`v` is an integer in (0, 2^40): a bool, float or string is refused, never coerced."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < MAX_SIZE:
        raise ConfigError(f"{key} must be a positive integer below 2^40, got {show_value(v)}")


def check_nonneg_int(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_SIZE:
        raise ConfigError(f"{key} must be a non-negative integer below 2^40, got {show_value(v)}")


def check_positive_number(key: str, v: Any) -> None:
    """A positive finite float or int (an epsilon, a rope base): no bool, no Infinity."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise ConfigError(f"{key} must be a positive finite number, got {show_value(v)}")


def check_initializer_range(v: Any) -> None:
    """`initializer_range`: a non-negative finite number (no bool, no Infinity)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ConfigError(f"initializer_range must be a non-negative finite number, got "
                          f"{show_value(v)}")


def check_token_ids(config: Any) -> None:
    """bos/pad/eos token ids: null or a non-negative integer (eos also a list of them), since a
    bool, float or string id would be taken as another token (or none) by a generation loop."""
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        v = getattr(config, key)
        ids = v if key == "eos_token_id" and isinstance(v, list) else [v]
        if v is None:
            continue
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_SIZE
                          for i in ids):
            what = "a token id or a list of them" if key == "eos_token_id" else "a token id"
            raise ConfigError(f"{key} must be {what} (a non-negative integer) or null, got "
                              f"{show_value(v)}")


class NestedConfig:
    """Base of a nested family's config (a dataclass subclass declares the fields).

    Shared fields every subclass declares: `hidden_size`, `num_hidden_layers`,
    `intermediate_size`, `num_attention_heads` and the
    heads it stores (`num_key_value_heads`; one int or one per layer), `head_dim`,
    `torch_dtype`, `matformer_base_intermediate_size`, `matformer_tier`,
    `matformer_base_num_key_value_heads`, `extra`. A subclass sets the class constants below
    and may override the hooks `_check_input`, `_read_special` and `_write_special`."""

    MODEL_TYPE: ClassVar[str] = ""
    """The `model_type` written to config.json."""
    ARCHITECTURE: ClassVar[str] = ""
    """The `architectures` entry of a uniform config (the transformers class that loads it)."""
    NESTED_ARCHITECTURE: ClassVar[str] = ""
    """The `architectures` entry of a per-layer config (only matformer loads it)."""
    NESTED_MODEL_TYPE: ClassVar[str] = ""
    """The `model_type` written for a per-layer config ("": `matformer_<MODEL_TYPE>`). Ours, so
    that transformers without matformer refuses it ("unknown model type") instead of building
    every layer at one size; `import matformer` registers it with transformers (`matformer.hf`).
    Read back as this family, as is the `MODEL_TYPE` that per-layer configs carried before."""
    KNOWN: ClassVar[frozenset[str]] = NESTED_KEYS
    """Keys read into fields by name; everything else goes to `extra`."""
    REWRITTEN: ClassVar[frozenset[str]] = REWRITTEN
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    """Keys a config.json must have, in the order they are reported missing."""
    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ()
    """Fields `to_dict` does not copy as they are (`_write_special` writes them)."""
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    PRESET_KIND: ClassVar[str] = ""
    """How an unknown preset is named in the error ("ViT " -> "unknown ViT preset")."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int | list[int]
    num_attention_heads: int | list[int]
    num_key_value_heads: Any
    head_dim: int | None
    torch_dtype: str
    matformer_base_intermediate_size: int | None
    matformer_tier: int | None
    matformer_base_num_key_value_heads: int | None
    extra: dict[str, Any]
    tie_word_embeddings: bool

    # ---- validation helpers (used by the subclasses' __post_init__) -------------------------

    def _per_layer(self, key: str) -> int | list[int]:
        """The value of `key` as stored: an int, or a per-layer list (a uniform list becomes its
        int, so a uniform config stays loadable by transformers)."""
        v = getattr(self, key)
        if isinstance(v, (list, tuple)):
            vals = list(v)
            if len(vals) != self.num_hidden_layers:
                raise ConfigError(f"{key} has {len(vals)} entries but num_hidden_layers="
                                  f"{self.num_hidden_layers}; a per-layer list needs one entry "
                                  f"per layer")
            for i, x in enumerate(vals):
                check_positive_int(f"{key}[{i}]", x)
            return vals[0] if vals and all(x == vals[0] for x in vals) else vals
        check_positive_int(key, v)
        return v

    def _check_base(self, base_key: str, key: str, stored: list[int]) -> None:
        """`base_key` (a full size) is a positive int holding every layer's stored `key`."""
        base = getattr(self, base_key)
        check_positive_int(base_key, base)
        for i, s in enumerate(stored):
            if s > base:
                raise ConfigError(f"{key} of layer {i} is {s}, more than {base_key}={base}")

    def _check_nested(self) -> None:
        """The checks every family runs after its own: the bases (defaulting to the widest
        layer), head_dim, the tier label's type, the dtype."""
        if self.matformer_base_intermediate_size is None:
            self.matformer_base_intermediate_size = max(self.layer_widths)
        self._check_base("matformer_base_intermediate_size", "intermediate_size", self.layer_widths)
        if self.matformer_base_num_key_value_heads is None:
            self.matformer_base_num_key_value_heads = max(self.layer_kv_heads)
        self._check_base("matformer_base_num_key_value_heads", "num_key_value_heads",
                         self.layer_kv_heads)
        if self.matformer_tier is not None:
            check_nonneg_int("matformer_tier", self.matformer_tier)
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype={show_value(self.torch_dtype)} is not one of {DTYPES}")

    # ---- derived -------------------------------------------------------------------------

    @property
    def layer_widths(self) -> list[int]:
        """Stored FFN width of each layer."""
        s = self.intermediate_size
        return list(s) if isinstance(s, list) else [s] * self.num_hidden_layers

    @property
    def layer_kv_heads(self) -> list[int]:
        """Stored KV heads of each layer."""
        v = self.num_key_value_heads
        return list(v) if isinstance(v, list) else [v] * self.num_hidden_layers

    @property
    def base(self) -> int:
        """B: the full (tier-0) FFN width the stored widths were cut from."""
        assert self.matformer_base_intermediate_size is not None
        return self.matformer_base_intermediate_size

    @property
    def base_kv_heads(self) -> int:
        """G: the full number of KV heads (matformer_base_num_key_value_heads)."""
        assert self.matformer_base_num_key_value_heads is not None
        return self.matformer_base_num_key_value_heads

    @property
    def stored_tier(self) -> int | None:
        """Tier of the stored widths, computed from the sizes (the rule of the spec §2)."""
        return uniform_tier(self.base, self.layer_widths)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (r), the same in every layer (1: multi-head attention)."""
        q = self.num_attention_heads
        return (q[0] if isinstance(q, list) else q) // self.layer_kv_heads[0]

    def with_widths(self, widths: int | list[int]) -> Self:
        """A copy describing the same model storing `widths` (same base); the tier label
        follows the sizes."""
        new = copy.deepcopy(self)
        new.intermediate_size = widths
        new.matformer_tier = None
        new.__post_init__()  # type: ignore[attr-defined]
        new.matformer_tier = new.stored_tier
        return new

    def with_kv_heads(self, kv_heads: int | list[int]) -> Self:
        """A copy storing `kv_heads` KV heads (int or per layer; the query heads follow, r per
        KV head); same base G and head_dim."""
        new = copy.deepcopy(self)
        r = self.group_size
        new.num_key_value_heads = kv_heads if isinstance(kv_heads, int) else list(kv_heads)
        new.num_attention_heads = (kv_heads * r if isinstance(kv_heads, int)
                                   else [g * r for g in kv_heads])
        new.__post_init__()  # type: ignore[attr-defined]
        return new

    def check_tier_label(self, source: str = "config.json") -> None:
        """A `matformer_tier` read from a file must agree with the stored sizes."""
        if self.matformer_tier is None or self.matformer_tier == self.stored_tier:
            return
        actual = self.stored_tier
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
    def dtype(self) -> Any:
        """The torch dtype of `torch_dtype` (imports torch: only a model needs it)."""
        import torch

        return getattr(torch, self.torch_dtype)

    # ---- config.json ---------------------------------------------------------------------

    @classmethod
    def _check_input(cls, d: dict[str, Any], source: str) -> None:
        """Hook: refuse a config.json this family cannot read faithfully (another model type,
        keys that change the outputs but are not the family's; default: accept any)."""

    @classmethod
    def _read_special(cls, d: dict[str, Any], kwargs: dict[str, Any], extra: dict[str, Any],
                      source: str) -> None:
        """Hook: read keys the generic split does not (e.g. the LM's rope_parameters)."""

    def _write_special(self, d: dict[str, Any]) -> None:
        """Hook: write the family's derived keys into the config.json object `d`."""

    @property
    def is_uniform(self) -> bool:
        """Every layer stores the same width and heads (transformers can load such a config)."""
        return (isinstance(self.intermediate_size, int)
                and isinstance(self.num_key_value_heads, int))

    def architecture(self) -> str:
        """The `architectures` entry written: the transformers class of a uniform config."""
        return self.ARCHITECTURE if self.is_uniform else self.NESTED_ARCHITECTURE

    @classmethod
    def nested_model_type(cls) -> str:
        """The `model_type` of this family's per-layer configs: `NESTED_MODEL_TYPE` as set on
        the class itself (a family subclassing another's config gets its own, never its
        parent's), else `matformer_<MODEL_TYPE>`."""
        return cls.__dict__.get("NESTED_MODEL_TYPE") or f"matformer_{cls.MODEL_TYPE}"

    def model_type(self) -> str:
        """The `model_type` written: the transformers one of a uniform config (it loads there
        unchanged), ours for a per-layer one."""
        return self.MODEL_TYPE if self.is_uniform else self.nested_model_type()

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> Self:
        """The config a parsed config.json object describes; every error names `source`."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") == cls.nested_model_type():  # ours: the family's own from here
            d = {**d, "model_type": cls.MODEL_TYPE}
        cls._check_input(d, source)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():
            if k in cls.KNOWN:
                kwargs[k] = v
            elif k not in cls.REWRITTEN:
                extra[k] = v
        cls._read_special(d, kwargs, extra, source)
        if d.get("dtype") is not None and kwargs.get("torch_dtype") is None:
            kwargs["torch_dtype"] = d["dtype"]  # transformers >= 4.56 writes `dtype`
        if kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)
        elif isinstance(kwargs["torch_dtype"], str):
            kwargs["torch_dtype"] = kwargs["torch_dtype"].removeprefix("torch.")
        for k in cls.REQUIRED:
            if k not in kwargs:
                raise ConfigError(f"{source}: required key {k!r} is missing")
        try:
            return cls(**kwargs, extra=extra)
        except (ConfigError, TypeError) as e:  # TypeError: types a dataclass can't even hold
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_text(cls, text: str, source: str = "config.json") -> Self:
        """The config of a config.json's text (strict JSON: no NaN or Infinity)."""
        def refuse(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        try:
            d = json.loads(text, parse_constant=refuse)
        except ValueError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=source)

    @classmethod
    def from_json_file(cls, path: Any) -> Self:
        """A config.json file as this family's config (a script's shortcut; the library reads
        checkpoint configs through `io.source.read_config_file`, which also refuses special
        and oversized files)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read ({e})") from None
        return cls.from_json_text(text, source=str(p))

    def to_dict(self) -> dict[str, Any]:
        """The config.json object. `matformer_tier` is recomputed from the stored sizes."""
        d: dict[str, Any] = dict(self.extra)
        d["model_type"] = self.model_type()
        d["architectures"] = [self.architecture()]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name not in ("extra", "matformer_tier", *self.DERIVED_FIELDS):
                d[f.name] = copy.deepcopy(getattr(self, f.name))
        d["matformer_tier"] = self.stored_tier
        d["dtype"] = self.torch_dtype
        self._write_special(d)
        return dict(sorted(d.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Self:
        """A named size (`PRESETS`), with any field overridden."""
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown {cls.PRESET_KIND}preset {name!r}; choose one of "
                              f"{', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


class WidthSetting:
    """Mixin: `widths`/`tier`/`layer_kv_heads`/`kv_heads`, `resolve_*`, `set_widths`, `at_width`.

    The model provides `config.base`, `config.base_kv_heads` and `_width_slots()`."""

    config: Any

    def _width_slots(self) -> list[tuple[Any, Any]]:
        """Per layer: (module with `width`/`stored_width`, module with `kv_heads`/`stored_kv_heads`)."""
        raise NotImplementedError

    @property
    def base_width(self) -> int:
        return self.config.base

    @property
    def base_kv_heads(self) -> int:
        return self.config.base_kv_heads

    @property
    def stored_widths(self) -> list[int]:
        return [ffn.stored_width for ffn, _ in self._width_slots()]

    @property
    def widths(self) -> list[int]:
        """Active FFN width of each layer."""
        return [ffn.width for ffn, _ in self._width_slots()]

    @property
    def tier(self) -> int | None:
        """Uniform tier the model currently computes at, or None for a Mix'n'Match setting."""
        return uniform_tier(self.base_width, self.widths)

    @property
    def stored_kv_heads(self) -> list[int]:
        """KV heads each layer stores."""
        return [attn.stored_kv_heads for _, attn in self._width_slots()]

    @property
    def layer_kv_heads(self) -> list[int]:
        """Active KV heads of each layer."""
        return [attn.kv_heads for _, attn in self._width_slots()]

    @property
    def kv_heads(self) -> int | None:
        """KV heads every layer currently runs, or None when the layers differ."""
        return uniform_kv_heads(self.layer_kv_heads)

    @property
    def setting(self) -> dict[str, list[int]]:
        """The active setting as `set_widths` keywords (restores it exactly)."""
        return {"widths": self.widths, "layer_kv_heads": self.layer_kv_heads}

    def resolve(self, request: WidthRequest, *, current: bool = False) -> Setting:
        """`request` checked against what this model stores: (per-layer widths, per-layer KV
        heads). An axis the request does not name is as stored, or with `current` as the model
        runs now (a call that runs at a width for that call only)."""
        setting = request.resolve_against(self.base_width, self.stored_widths,
                                          self.base_kv_heads, self.stored_kv_heads)
        if current:
            setting = Setting(setting.widths if request.names_ffn else self.widths,
                              setting.kv_heads if request.names_heads else self.layer_kv_heads)
        return setting

    def resolve_widths(self, *, tier: int | None = None, layer_tiers: Sequence[int] | None = None,
                       widths: int | Sequence[int] | None = None) -> list[int]:
        """Validated per-layer widths for a request (no argument: the stored widths); tiers are
        absolute (relative to the base). A width wider than a layer stores is a TierError."""
        request = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths)
        return self.resolve(request).widths

    def resolve_kv_heads(self, *, kv_heads: int | None = None,
                         layer_kv_heads: Sequence[int] | None = None) -> list[int]:
        """Validated per-layer KV heads for a request (no argument: the stored heads). More heads
        than a layer stores is a TierError."""
        return self.resolve(WidthRequest(kv_heads=kv_heads, layer_kv_heads=layer_kv_heads)).kv_heads

    def apply(self, request: WidthRequest | Setting) -> Self:
        """Run at `request` (an axis it does not name goes back to what is stored), or at an
        already resolved `Setting` (from `resolve`: not checked again)."""
        setting = request if isinstance(request, Setting) else self.resolve(request)
        slots = self._width_slots()
        for (ffn, attn), w, g in zip(slots, setting.widths, setting.kv_heads, strict=True):
            ffn.width = w
            attn.kv_heads = g
        return self

    def set_widths(self, *, tier: int | None = None, layer_tiers: Sequence[int] | None = None,
                   widths: int | Sequence[int] | None = None, kv_heads: int | None = None,
                   layer_kv_heads: Sequence[int] | None = None) -> Self:
        """Set the active FFN width (`tier`/`layer_tiers`/`widths`) and KV heads (`kv_heads`/
        `layer_kv_heads`) of every layer. An axis not named goes back to what is stored (no
        argument: the stored model)."""
        return self.apply(WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths,
                                       kv_heads=kv_heads, layer_kv_heads=layer_kv_heads))

    @contextlib.contextmanager
    def running(self, request: WidthRequest | Setting) -> Iterator[Self]:
        """Run at `request` inside a `with` block (as `apply`); the previous setting (widths and
        heads) is restored after."""
        previous = Setting(self.widths, self.layer_kv_heads)
        self.apply(request)
        try:
            yield self
        finally:
            self.apply(previous)

    def at_width(self, *, tier: int | None = None, layer_tiers: Sequence[int] | None = None,
                 widths: int | Sequence[int] | None = None, kv_heads: int | None = None,
                 layer_kv_heads: Sequence[int] | None = None
                 ) -> contextlib.AbstractContextManager[Self]:
        """Run at another setting inside a `with` block (as `set_widths`); the previous setting
        (widths and heads) is restored after."""
        return self.running(WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths,
                                         kv_heads=kv_heads, layer_kv_heads=layer_kv_heads))
