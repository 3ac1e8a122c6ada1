"""`MatViTConfig`: a MatViT's config.json — transformers' ViT config plus the MatFormer keys.

A config whose FFN width and head count are the same in every layer is a valid transformers
`ViTConfig` (`model_type: vit`, `architectures: ["ViTForImageClassification"]`), so a uniform tier
cut out of a MatViT loads in `ViTForImageClassification.from_pretrained` as is. The MatFormer keys
follow the checkpoint contract (docs/FORMAT.md), on both elastic axes:

- `intermediate_size`: the FFN width actually stored, an int or one int per layer;
  `matformer_base_intermediate_size`: the full width B it was cut from (always written);
  `matformer_tier`: tier of the stored tensors, recomputed from the sizes on every write, never
  the width a model computed at.
- `num_attention_heads`: the heads actually stored (an int, or one per layer);
  `matformer_base_num_key_value_heads`: the full head count G (always written; ViT attention is
  plain multi-head, so its KV heads are its heads); `head_dim` is always written, since it no
  longer follows from `hidden_size / num_attention_heads` once heads are cut.

Torch-free (so `matformer info` can read it), and it holds the architecture arithmetic: expected
tensor shapes and parameter counts at any widths.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matformer.errors import ConfigError
from matformer.tiers import uniform_tier

MODEL_TYPE = "vit"
ARCHITECTURE = "ViTForImageClassification"
# A per-layer (Mix'n'Match) config: our loader reads it, transformers' ViT cannot.
NESTED_ARCHITECTURE = "MatViTForImageClassification"
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new")
_DTYPES = ("float32", "float16", "bfloat16")

_KNOWN = {
    "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "head_dim", "intermediate_size", "num_labels", "id2label",
    "hidden_act", "layer_norm_eps", "qkv_bias", "initializer_range", "torch_dtype",
    "matformer_base_intermediate_size", "matformer_tier", "matformer_base_num_key_value_heads",
}
# Derived or rewritten on every write, never carried over from `extra`.
_REWRITTEN = {"model_type", "architectures", "dtype", "transformers_version", "label2id"}


@dataclass
class MatViTConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int | list[int] = 12
    """Attention heads stored in the weights: one int, or one int per layer."""
    head_dim: int | None = None
    """None means hidden_size // (base head count)."""
    intermediate_size: int | list[int] = 3072
    """FFN width stored in the weights: one int, or one int per layer (Mix'n'Match)."""
    num_labels: int | None = None
    """None: len(id2label), or 1000 when neither is given."""
    id2label: dict[int, str] | None = None
    """Class names by index; None: LABEL_0, LABEL_1, ... as transformers writes them."""
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    initializer_range: float = 0.02
    torch_dtype: str = "float32"
    matformer_base_intermediate_size: int | None = None
    """Full (tier-0) FFN width B. None: B = the widest stored layer."""
    matformer_tier: int | None = None
    """Tier of the stored FFN weights as read from a file; recomputed from the sizes on write."""
    matformer_base_num_key_value_heads: int | None = None
    """Full head count G. None: G = the most heads any layer stores."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Unknown config.json keys (dropout rates, pooler settings, ...), kept for the round trip."""

    def __post_init__(self) -> None:
        for key in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers"):
            _positive_int(key, getattr(self, key))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                f"pick a patch size that tiles the image"
            )
        self.intermediate_size = self._per_layer("intermediate_size", self.intermediate_size)
        self.num_attention_heads = self._per_layer("num_attention_heads", self.num_attention_heads)
        if self.matformer_base_intermediate_size is None:
            self.matformer_base_intermediate_size = max(self.layer_widths)
        if self.matformer_base_num_key_value_heads is None:
            self.matformer_base_num_key_value_heads = max(self.layer_kv_heads)
        self._check_base("matformer_base_intermediate_size", "intermediate_size", self.layer_widths)
        self._check_base("matformer_base_num_key_value_heads", "num_attention_heads", self.layer_kv_heads)
        if self.head_dim is None:
            if self.hidden_size % self.base_kv_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.base_kv_heads}; change one of them or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.base_kv_heads
        _positive_int("head_dim", self.head_dim)
        if self.matformer_tier is not None:
            _nonneg_int("matformer_tier", self.matformer_tier)
        self._check_labels()
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ConfigError(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        if self.torch_dtype not in _DTYPES:
            raise ConfigError(f"torch_dtype={self.torch_dtype!r} is not one of {_DTYPES}")

    def _per_layer(self, key: str, value: Any) -> int | list[int]:
        """An int, or a per-layer list (a uniform list becomes its int: transformers-loadable)."""
        if not isinstance(value, (list, tuple)):
            _positive_int(key, value)
            return value
        sizes = list(value)
        if len(sizes) != self.num_hidden_layers:
            raise ConfigError(
                f"{key} has {len(sizes)} entries but num_hidden_layers={self.num_hidden_layers}; "
                f"a per-layer list needs one entry per layer"
            )
        for i, s in enumerate(sizes):
            _positive_int(f"{key}[{i}]", s)
        return sizes[0] if all(s == sizes[0] for s in sizes) else sizes

    def _check_base(self, base_key: str, key: str, stored: list[int]) -> None:
        base = getattr(self, base_key)
        _positive_int(base_key, base)
        for i, s in enumerate(stored):
            if s > base:
                raise ConfigError(f"{key} of layer {i} is {s}, more than {base_key}={base}")

    def _check_labels(self) -> None:
        if self.id2label is not None:
            if not isinstance(self.id2label, dict):
                raise ConfigError(f"id2label must be an object {{index: name}}, got {self.id2label!r}")
            try:
                labels = {int(k): str(v) for k, v in self.id2label.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"id2label keys must be class indices, got {list(self.id2label)}") from None
            if sorted(labels) != list(range(len(labels))):
                raise ConfigError(f"id2label must name classes 0..{len(labels) - 1}, got {sorted(labels)}")
            if self.num_labels is not None and self.num_labels != len(labels):
                raise ConfigError(
                    f"num_labels={self.num_labels} disagrees with id2label ({len(labels)} names); "
                    f"fix or remove one of them"
                )
            self.id2label = labels
            self.num_labels = len(labels)
        if self.num_labels is None:
            self.num_labels = 1000
        _positive_int("num_labels", self.num_labels)
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}

    # ---- derived -------------------------------------------------------------------------

    @property
    def layer_widths(self) -> list[int]:
        """Stored FFN width of each layer."""
        s = self.intermediate_size
        return list(s) if isinstance(s, list) else [s] * self.num_hidden_layers

    @property
    def layer_kv_heads(self) -> list[int]:
        """Stored attention heads of each layer (multi-head attention: they are its KV heads)."""
        h = self.num_attention_heads
        return list(h) if isinstance(h, list) else [h] * self.num_hidden_layers

    @property
    def base(self) -> int:
        assert self.matformer_base_intermediate_size is not None
        return self.matformer_base_intermediate_size

    @property
    def base_kv_heads(self) -> int:
        assert self.matformer_base_num_key_value_heads is not None
        return self.matformer_base_num_key_value_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def stored_tier(self) -> int | None:
        """Tier of the stored FFN widths, from the sizes (the truth rule)."""
        return uniform_tier(self.base, self.layer_widths)

    @property
    def is_uniform(self) -> bool:
        """Every layer stores the same width and heads: a plain transformers ViT config."""
        return isinstance(self.intermediate_size, int) and isinstance(self.num_attention_heads, int)

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

    # The LM config's names for what a MatViT also has, so loaders and writers read both alike.
    tie_word_embeddings = False
    """A ViT has no token embedding to tie."""

    @property
    def num_key_value_heads(self) -> int | list[int]:
        """Multi-head attention: the KV heads are the heads."""
        return self.num_attention_heads

    @num_key_value_heads.setter
    def num_key_value_heads(self, heads: int | list[int]) -> None:
        self.num_attention_heads = heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head: 1 (multi-head attention)."""
        return 1

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.torch_dtype)

    def with_widths(self, widths: int | list[int] | None = None,
                    heads: int | list[int] | None = None) -> MatViTConfig:
        """A copy describing the same model storing `widths` FFN neurons and `heads` heads
        (None: unchanged); the bases and head_dim stay, the tier label follows the sizes."""
        new = copy.deepcopy(self)
        if widths is not None:
            new.intermediate_size = widths
        if heads is not None:
            new.num_attention_heads = heads
        new.matformer_tier = None
        new.__post_init__()
        new.matformer_tier = new.stored_tier
        return new

    def with_kv_heads(self, heads: int | list[int]) -> MatViTConfig:
        """A copy storing `heads` heads per layer (the LM config's name for `with_widths(heads=)`)."""
        return self.with_widths(heads=heads)

    # ---- config.json ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> MatViTConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type={d.get('model_type')!r} is not a ViT ('vit')")
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():
            if k in _KNOWN:
                kwargs[k] = v
            elif k not in _REWRITTEN:
                extra[k] = v
        if d.get("dtype") is not None and kwargs.get("torch_dtype") is None:
            kwargs["torch_dtype"] = d["dtype"]
        if kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)
        elif isinstance(kwargs["torch_dtype"], str):
            kwargs["torch_dtype"] = kwargs["torch_dtype"].removeprefix("torch.")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "image_size", "patch_size"):
            if k not in kwargs:
                raise ConfigError(f"{source}: required key {k!r} is missing")
        try:
            return cls(**kwargs, extra=extra)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json object. `matformer_tier` is recomputed from the stored sizes."""
        d: dict[str, Any] = dict(self.extra)
        d["model_type"] = MODEL_TYPE
        d["architectures"] = [ARCHITECTURE if self.is_uniform else NESTED_ARCHITECTURE]
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "matformer_tier", "id2label"):
                d[f.name] = copy.deepcopy(getattr(self, f.name))
        assert self.id2label is not None
        d["id2label"] = {str(i): name for i, name in sorted(self.id2label.items())}
        d["label2id"] = {name: i for i, name in sorted(self.id2label.items())}
        d["matformer_tier"] = self.stored_tier
        d["dtype"] = self.torch_dtype
        return dict(sorted(d.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MatViTConfig:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read ({e})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(p))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MatViTConfig:
        if name not in VIT_PRESETS:
            raise ConfigError(f"unknown ViT preset {name!r}; choose one of {', '.join(VIT_PRESETS)}")
        return cls(**{**VIT_PRESETS[name], **overrides})


def is_vit_config(d: Any) -> bool:
    """Whether a parsed config.json describes a ViT (so the MatViT loader should read it)."""
    return isinstance(d, dict) and d.get("model_type") == MODEL_TYPE


# ---- architecture arithmetic (torch-free) ----------------------------------------------------

def _layer_prefix(i: int) -> str:
    return f"vit.encoder.layer.{i}."


def expected_shapes(config: MatViTConfig, widths: list[int] | None = None,
                    kv_heads: list[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of a MatViT of `config` storing `widths` FFN neurons and `kv_heads` heads per
    layer (default: the stored ones), by transformers' ViT name (the names its files use)."""
    h, c, p, hd = config.hidden_size, config.num_channels, config.patch_size, config.head_dim
    assert hd is not None
    ws = config.layer_widths if widths is None else list(widths)
    gs = config.layer_kv_heads if kv_heads is None else list(kv_heads)
    shapes: dict[str, tuple[int, ...]] = {
        "vit.embeddings.cls_token": (1, 1, h),
        "vit.embeddings.position_embeddings": (1, config.num_patches + 1, h),
        "vit.embeddings.patch_embeddings.projection.weight": (h, c, p, p),
        "vit.embeddings.patch_embeddings.projection.bias": (h,),
    }
    for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
        pre = _layer_prefix(i)
        for proj in ("query", "key", "value"):
            shapes[f"{pre}attention.attention.{proj}.weight"] = (g * hd, h)
            if config.qkv_bias:
                shapes[f"{pre}attention.attention.{proj}.bias"] = (g * hd,)
        shapes[f"{pre}attention.output.dense.weight"] = (h, g * hd)
        shapes[f"{pre}attention.output.dense.bias"] = (h,)
        shapes[f"{pre}intermediate.dense.weight"] = (w, h)
        shapes[f"{pre}intermediate.dense.bias"] = (w,)
        shapes[f"{pre}output.dense.weight"] = (h, w)
        shapes[f"{pre}output.dense.bias"] = (h,)
        for norm in ("layernorm_before", "layernorm_after"):
            shapes[f"{pre}{norm}.weight"] = (h,)
            shapes[f"{pre}{norm}.bias"] = (h,)
    shapes["vit.layernorm.weight"] = (h,)
    shapes["vit.layernorm.bias"] = (h,)
    shapes["classifier.weight"] = (config.num_labels or 0, h)
    shapes["classifier.bias"] = (config.num_labels or 0,)
    return shapes


def parameter_counts(config: MatViTConfig, widths: list[int] | None = None,
                     kv_heads: list[int] | None = None) -> dict[str, int]:
    """Parameters of the model running at `widths` FFN neurons and `kv_heads` heads per layer
    (default: the stored ones): `embedding` (patch projection, class token, positions),
    `head` (classifier), `non_embedding` (the encoder blocks and final norm), `total`."""
    ws = config.layer_widths if widths is None else list(widths)
    gs = config.layer_kv_heads if kv_heads is None else list(kv_heads)
    h, hd = config.hidden_size, config.head_dim
    assert hd is not None and config.num_labels is not None
    qkv_bias = 1 if config.qkv_bias else 0
    blocks = sum(
        3 * g * hd * (h + qkv_bias) + g * hd * h + h  # query/key/value, attention output
        + w * h + w + h * w + h  # intermediate.dense, output.dense
        + 4 * h  # two LayerNorms
        for w, g in zip(ws, gs, strict=True)
    )
    non_emb = blocks + 2 * h
    emb = h * config.num_channels * config.patch_size**2 + h + h + (config.num_patches + 1) * h
    head = config.num_labels * (h + 1)
    return {"embedding": emb, "head": head, "non_embedding": non_emb, "total": emb + head + non_emb}


def _positive_int(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {v!r}")


def _nonneg_int(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{key} must be a non-negative integer, got {v!r}")


# Named shapes, by the same names as the language model's presets (`--arch vit --preset tiny`).
# `debug` is for tests; `tiny` trains on the 8x8 digits in minutes on two cores (patch 2: 16
# patches + the class token; FFN 8x hidden, so the widths differ in size); `small` is a
# DeiT-Ti-like encoder for 32x32 images (CIFAR-sized folders); `base` is ViT-B/16.
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(image_size=8, patch_size=4, num_channels=1, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  num_labels=10),
    "tiny": dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64,
                 num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                 num_labels=10),
    "small": dict(image_size=32, patch_size=4, num_channels=3, hidden_size=192,
                  num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                  num_labels=10),
    "base": dict(image_size=224, patch_size=16, num_channels=3, hidden_size=768,
                 num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 num_labels=1000),
}
