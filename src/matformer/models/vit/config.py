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
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from matformer.errors import ConfigError
from matformer.models.nesting import (
    NESTED_KEYS,
    REWRITTEN,
    NestedConfig,
    check_positive_int,
    check_positive_number,
)

MODEL_TYPE = "vit"
ARCHITECTURE = "ViTForImageClassification"
# A per-layer (Mix'n'Match) config: our loader reads it, transformers' ViT cannot.
NESTED_ARCHITECTURE = "MatViTForImageClassification"
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new")


@dataclass
class MatViTConfig(NestedConfig):
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

    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    NESTED_ARCHITECTURE: ClassVar[str] = NESTED_ARCHITECTURE
    KNOWN: ClassVar[frozenset[str]] = NESTED_KEYS | {
        "image_size", "patch_size", "num_channels", "hidden_size", "num_labels", "id2label",
        "hidden_act", "layer_norm_eps", "qkv_bias"}
    REWRITTEN: ClassVar[frozenset[str]] = REWRITTEN | {"label2id"}
    REQUIRED: ClassVar[tuple[str, ...]] = ("hidden_size", "num_hidden_layers",
                                           "num_attention_heads", "intermediate_size",
                                           "image_size", "patch_size")
    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("id2label",)
    PRESET_KIND: ClassVar[str] = "ViT "

    def __post_init__(self) -> None:
        for key in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers"):
            check_positive_int(key, getattr(self, key))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                f"pick a patch size that tiles the image"
            )
        self.intermediate_size = self._per_layer("intermediate_size")
        self.num_attention_heads = self._per_layer("num_attention_heads")
        self._check_nested()
        if self.head_dim is None:
            if self.hidden_size % self.base_kv_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.base_kv_heads}; change one of them or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.base_kv_heads
        check_positive_int("head_dim", self.head_dim)
        self._check_labels()
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")
        check_positive_number("layer_norm_eps", self.layer_norm_eps)
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"qkv_bias must be true or false, got {self.qkv_bias!r}")

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
        check_positive_int("num_labels", self.num_labels)
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}

    # ---- derived -------------------------------------------------------------------------

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

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
    def _check_input(cls, d: dict[str, Any], source: str) -> None:
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type={d.get('model_type')!r} is not a ViT ('vit')")

    def _write_special(self, d: dict[str, Any]) -> None:
        assert self.id2label is not None
        d["id2label"] = {str(i): name for i, name in sorted(self.id2label.items())}
        d["label2id"] = {name: i for i, name in sorted(self.id2label.items())}


# ---- architecture arithmetic (torch-free) ----------------------------------------------------

LAYER_PREFIX = "vit.encoder.layer."
"""Per-layer tensors are named LAYER_PREFIX + index + "." + the rest (transformers' ViT)."""


_NESTED_FFN = re.compile(r"^vit\.encoder\.layer\.\d+\.(intermediate\.dense\.weight|"
                         r"intermediate\.dense\.bias|output\.dense\.weight)$")


def nested_axis(name: str) -> tuple[str, int] | None:
    """How parameter `name` nests in training: ("ffn", 0) rows of intermediate.dense (weight and
    bias), ("ffn", 1) columns of the block's output.dense weight (its bias is not nested); None:
    not nested (MatViT's heads are cut at slicing and run time, not nested by the optimizer)."""
    m = _NESTED_FFN.match(name)
    if m is None:
        return None
    return "ffn", 1 if m.group(1) == "output.dense.weight" else 0


def _layer_prefix(i: int) -> str:
    return f"{LAYER_PREFIX}{i}."


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
MatViTConfig.PRESETS = VIT_PRESETS
