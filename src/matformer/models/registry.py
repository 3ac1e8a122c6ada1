"""The model-family registry: one frozen `Family` record per family, found from config.json.

Every stage (io, slicing, training, evaluation, cli) asks here instead of naming a family, so
adding one is: its folder `models/<family>/` (a config subclassing `nesting.NestedConfig`, a
model mixing in `nesting.WidthSetting`, its shape arithmetic), one `register(Family(...))`
below, and its tests. Built in:

- `lm`: the language model (`MatFormerConfig` / `MatFormerLM`, transformers' Llama layout, with
  Llama 3.x rope scaling); the default family, so a config.json of no known family is read as
  one (its reader then says what is wrong with it);
- `mistral`, `qwen2`, `qwen3`: the same block with a sliding window, q/k/v biases, per-head q/k
  norms (`models/<family>/config.py`: a `MatFormerConfig` subclass naming its `Dialect`, model
  type, transformers class and llama.cpp architecture; the model and shapes are the LM's, which
  read those switches from the config);
- `vit`: MatViT (`MatViTConfig` / `MatViT`, transformers' ViT layout), `model_type: "vit"`;
- `gemma3`: Gemma 3 text (`Gemma3Config` / `Gemma3LM`, transformers' `Gemma3ForCausalLM`
  layout, `model_type` `gemma3_text`), nested on both axes like `lm`;
- `gemma3n`: Hugging Face Gemma 3n (`model_type` `gemma3n` or `gemma3n_text`), read but not
  loaded: `matformer.slicing.gemma3n` slices and describes it from its own config reader, and
  asking for its config as one of ours is a one-line error (`check_loadable`).

Torch-free: a record names its model class by dotted path and imports it only when asked
(`Family.model_class()`), so `matformer info` never imports torch.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matformer.errors import ConfigError
from matformer.models.gemma3 import config as gemma3_config
from matformer.models.gemma3 import shapes as gemma3_shapes
from matformer.models.lm import config as lm_config
from matformer.models.lm import shapes as lm_shapes
from matformer.models.mistral.config import MistralConfig
from matformer.models.nesting import NestedConfig
from matformer.models.qwen2.config import Qwen2Config
from matformer.models.qwen3.config import Qwen3Config
from matformer.models.vit import config as vit_config
from matformer.models.vit.config import MatViTConfig

Config = NestedConfig
"""The config of any loadable family."""
Shapes = Callable[[Any, Sequence[int] | None, Sequence[int] | None], dict[str, tuple[int, ...]]]
Counts = Callable[[Any, Sequence[int] | None, Sequence[int] | None], dict[str, int]]

CAUSAL_LM = "causal-lm"
"""Task of a text decoder: trained, evaluated and run by the language-model stages."""
IMAGE_CLASSIFICATION = "image-classification"
"""Task of an image encoder with a classifier (MatViT's training, evaluation and report)."""


@dataclass(frozen=True, eq=False)
class Family:
    """What the stages need to know about one model family (compared and hashed by identity:
    one record per family)."""

    name: str
    """The family's name: `--arch`, `Source.family.name`, `family(name)`."""
    model_types: tuple[str, ...]
    """The config.json `model_type`s read as this family (the first is the one a uniform config
    writes; a per-layer one writes the config class's `nested_model_type`, also read)."""
    architectures: tuple[str, ...] = ()
    """Hugging Face `architectures` of its configs: (a uniform config, which transformers loads;
    a per-layer one, which only matformer loads). Detection is by `model_type`."""
    config_class: type[NestedConfig] | None = None
    """Its config (None: a family matformer reads but does not load)."""
    model_path: str | None = None
    """'module:Class' of its model, imported only by `model_class()` (torch)."""
    task: str = CAUSAL_LM
    """What the model does (`CAUSAL_LM`, `IMAGE_CLASSIFICATION`): which training loop,
    evaluation and report the stages use for it."""
    layer_prefix: str = ""
    """Name prefix of per-layer tensors, followed by the layer index and a dot
    ('model.layers.' -> 'model.layers.3.mlp.up_proj.weight')."""
    embedding_prefixes: tuple[str, ...] = ()
    """Tensor-name prefixes counted as embedding parameters (not in the paper's size measure)."""
    tied: Mapping[str, str] = field(default_factory=dict)
    """Tensors that `tie_word_embeddings` stores once: {tied name: name it shares}."""
    shapes: Shapes | None = None
    """`shapes(config, widths, kv_heads)`: every tensor of a checkpoint and its shape."""
    counts: Counts | None = None
    """`counts(config, widths, kv_heads)`: {'embedding', 'non_embedding', 'total', ...}."""
    summary: Callable[[Any], str] | None = None
    """One line of what the config describes beyond widths and heads (`matformer info`)."""
    info: Callable[[Any], dict[str, Any]] | None = None
    """Family-specific keys of `checkpoint_info`."""
    nested: Callable[[str], tuple[str, int] | None] | None = None
    """`nested(parameter name)`: ("ffn" | "heads", the dimension its prefix is cut along) for a
    nested parameter, None for a plain one (training's optimizer and sharding)."""
    title: str = ""
    """The name people know it by, for messages (default: `name`)."""
    docs: str = ""
    """Where its documentation is (named by the error of a family matformer does not load)."""
    gguf_arch: str | None = None
    """llama.cpp's architecture name for a uniform model of this family (None: no GGUF
    export)."""

    @property
    def all_model_types(self) -> tuple[str, ...]:
        """Every config.json `model_type` read as this family: `model_types` and the one of its
        per-layer configs (`NestedConfig.nested_model_type`, e.g. "matformer")."""
        nested = () if self.config_class is None else (self.config_class.nested_model_type(),)
        return self.model_types + tuple(t for t in nested if t not in self.model_types)

    @property
    def loadable(self) -> bool:
        return self.config_class is not None

    @property
    def text(self) -> bool:
        """A text language model (tokenizer, generation, the LM evaluation)."""
        return self.task == CAUSAL_LM

    def model_class(self) -> type:
        """The model class (imports it, and so torch)."""
        if self.model_path is None:
            raise ConfigError(f"the {self.name} family has no model in matformer")
        module, _, name = self.model_path.partition(":")
        return getattr(importlib.import_module(module), name)

    def layer_of(self, tensor: str) -> tuple[int, str] | None:
        """(layer index, rest of the name) of a per-layer tensor, None for any other."""
        m = _layer_re(self.layer_prefix).match(tensor) if self.layer_prefix else None
        return None if m is None else (int(m.group(1)), m.group(2))

    def layer_name(self, index: int, rest: str) -> str:
        """The name of tensor `rest` of layer `index` (`layer_of`'s inverse)."""
        return f"{self.layer_prefix}{index}.{rest}"

    def is_embedding(self, tensor: str) -> bool:
        return tensor.startswith(self.embedding_prefixes)


@functools.cache
def _layer_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}(\d{{1,9}})\.(.+)$")


_FAMILIES: dict[str, Family] = {}
DEFAULT = "lm"
"""The family a config.json of no registered `model_type` is read as."""


def register(fam: Family) -> Family:
    """Add a family (a name or a model_type already taken is a bug: ValueError)."""
    if fam.name in _FAMILIES:
        raise ValueError(f"model family {fam.name!r} is already registered")
    taken = {t for f in _FAMILIES.values() for t in f.all_model_types}
    if taken & set(fam.all_model_types):
        raise ValueError(f"model_type {sorted(taken & set(fam.all_model_types))} is already read "
                         f"by another family")
    _FAMILIES[fam.name] = fam
    return fam


def unregister(name: str) -> None:
    """Remove a family (tests that register a toy one)."""
    if name == DEFAULT:
        raise ValueError(f"the default family {name!r} cannot be removed")
    _FAMILIES.pop(name, None)


def families() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_FAMILIES.values())


def family(name: str) -> Family:
    """The family called `name` (an unknown one is a one-line ConfigError)."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; one of "
                          f"{', '.join(_FAMILIES)}") from None


def family_of(config_dict: Any) -> Family:
    """The family of a parsed config.json, by its `model_type` (none, or one no family reads:
    the default family, whose reader then says what is wrong)."""
    if isinstance(config_dict, dict):
        mt = config_dict.get("model_type")
        for fam in _FAMILIES.values():
            if fam.name != DEFAULT and mt in fam.all_model_types:
                return fam
    return _FAMILIES[DEFAULT]


def family_of_config(config: Any) -> Family:
    """The family whose config class `config` is (subclasses included)."""
    for fam in _FAMILIES.values():
        if fam.config_class is not None and type(config) is fam.config_class:
            return fam
    for fam in _FAMILIES.values():
        if fam.config_class is not None and isinstance(config, fam.config_class):
            return fam
    raise ConfigError(f"{type(config).__name__} is the config of no registered model family")


def family_of_model(model: Any) -> Family:
    """The family of a model (through its config; a DDP / compiled wrapper is looked through)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return family_of_config(getattr(getattr(model, "_orig_mod", model), "config", None))


def nested_axis(name: str) -> tuple[str, int] | None:
    """How a model parameter `name` nests, by the rule of the family whose names it uses:
    ("ffn" | "heads", dimension), or None for a plain parameter."""
    for fam in _FAMILIES.values():
        if fam.nested is not None and (axis := fam.nested(name)) is not None:
            return axis
    return None


def check_loadable(fam: Family, source: str) -> None:
    """The one-line error for a family matformer reads but does not load or run."""
    if not fam.loadable:
        docs = f", {fam.docs}" if fam.docs else ""
        raise ConfigError(f"{source}: a Hugging Face {fam.title or fam.name} checkpoint; matformer "
                          f"slices and describes it (`matformer slice`, `matformer info`{docs}) "
                          f"but does not load or run it")


def config_from_dict(d: Any, source: str = "config.json") -> NestedConfig:
    """The config a parsed config.json describes, as its family's config class."""
    fam = family_of(d)
    check_loadable(fam, source)
    assert fam.config_class is not None
    return fam.config_class.from_dict(d, source=source)


def expected_shapes(config: NestedConfig, widths: Sequence[int] | None = None,
                    kv_heads: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of `config` at `widths`/`kv_heads` (default: as stored)."""
    fam = family_of_config(config)
    assert fam.shapes is not None
    return fam.shapes(config, None if widths is None else list(widths),
                      None if kv_heads is None else list(kv_heads))


def parameter_counts(config: NestedConfig, widths: Sequence[int] | None = None,
                     kv_heads: Sequence[int] | None = None) -> dict[str, int]:
    """Parameter counts of `config` at `widths`/`kv_heads`; every family reports `embedding`,
    `non_embedding` and `total` (MatViT also its classifier `head`)."""
    fam = family_of_config(config)
    assert fam.counts is not None
    return fam.counts(config, None if widths is None else list(widths),
                      None if kv_heads is None else list(kv_heads))


def non_embedding_parameters(config: NestedConfig, widths: Sequence[int] | None = None,
                             kv_heads: Sequence[int] | None = None) -> int:
    """The size the paper compares widths by, in any family."""
    return parameter_counts(config, widths, kv_heads)["non_embedding"]


# ---- the built-in families ---------------------------------------------------------------------

def _lm_summary(c: Any, title: str = "") -> str:
    parts = [f"{title}: vocab {c.vocab_size}" if title else f"vocab {c.vocab_size}"]
    if c.rope.scaled:
        parts.append(f"rope {c.rope.rope_type} x{c.rope.params.get('factor')}")
    windows = sorted({w for w in c.layer_windows if w is not None})
    if windows:
        n = sum(w is not None for w in c.layer_windows)
        parts.append(f"sliding window {'/'.join(map(str, windows))} in {n} of "
                     f"{c.num_hidden_layers} layers")
    if c.qkv_bias:
        parts.append("q/k/v biases")
    if c.qk_norm:
        parts.append("q/k norms")
    return ", ".join(parts)


def _lm_info(c: Any) -> dict[str, Any]:
    return {"vocab_size": c.vocab_size, "model_type": c.MODEL_TYPE,
            "rope_type": c.rope.rope_type, "sliding_windows": c.layer_windows
            if c.sliding else None, "attention_bias": c.qkv_bias, "qk_norm": c.qk_norm}


def llama_block_family(name: str, config_class: type[lm_config.MatFormerConfig],
                       title: str) -> Family:
    """The record of a family on the Llama block: the LM's model, shapes and nesting, read
    through `config_class` (its Dialect, model_type, transformers class, llama.cpp arch)."""
    return Family(
        name=name, model_types=tuple(t for t in config_class.DIALECT.model_types if t),
        architectures=(config_class.ARCHITECTURE, config_class.NESTED_ARCHITECTURE),
        config_class=config_class, model_path="matformer.models.lm.model:MatFormerLM",
        task=CAUSAL_LM, layer_prefix=lm_shapes.LAYER_PREFIX, nested=lm_shapes.nested_axis,
        embedding_prefixes=(lm_shapes.EMBEDDING, lm_shapes.LM_HEAD),
        tied={lm_shapes.LM_HEAD: lm_shapes.EMBEDDING},
        shapes=lm_shapes.expected_shapes, counts=lm_shapes.parameter_counts,
        summary=lambda c: _lm_summary(c, "" if name == DEFAULT and not c.rope.scaled else title),
        info=_lm_info, title=title, gguf_arch=config_class.GGUF_ARCH)


LM = register(llama_block_family("lm", lm_config.MatFormerConfig, "Llama"))
MISTRAL = register(llama_block_family("mistral", MistralConfig, "Mistral"))
QWEN2 = register(llama_block_family("qwen2", Qwen2Config, "Qwen2"))
QWEN3 = register(llama_block_family("qwen3", Qwen3Config, "Qwen3"))
LLAMA_BLOCK = (LM, MISTRAL, QWEN2, QWEN3)
"""The families whose model is `MatFormerLM` (convert, GGUF export and input read them)."""
VIT = register(Family(
    name="vit", model_types=(vit_config.MODEL_TYPE,),
    architectures=(vit_config.ARCHITECTURE, vit_config.NESTED_ARCHITECTURE),
    config_class=MatViTConfig, model_path="matformer.models.vit.model:MatViT",
    task=IMAGE_CLASSIFICATION, layer_prefix=vit_config.LAYER_PREFIX,
    nested=vit_config.nested_axis,
    embedding_prefixes=("vit.embeddings.", "classifier."),
    shapes=vit_config.expected_shapes, counts=vit_config.parameter_counts,
    summary=lambda c: (f"MatViT: {c.image_size}px images, patch {c.patch_size}, "
                       f"{c.num_channels} channel(s), {c.num_labels} classes"),
    info=lambda c: {"vocab_size": None, "model_type": vit_config.MODEL_TYPE,
                    "image_size": c.image_size, "patch_size": c.patch_size,
                    "num_channels": c.num_channels, "num_labels": c.num_labels},
))
GEMMA3N = register(Family(
    name="gemma3n", model_types=("gemma3n", "gemma3n_text"),
    architectures=("Gemma3nForConditionalGeneration", "Gemma3nForCausalLM"),
    title="Gemma 3n", docs="docs/GEMMA3N.md",
))
GEMMA3N_MODEL_TYPES = GEMMA3N.model_types
"""Gemma3nForConditionalGeneration (multimodal) and Gemma3nForCausalLM (text-only)."""
GEMMA3 = register(Family(
    name="gemma3", model_types=(gemma3_config.MODEL_TYPE,),
    architectures=(gemma3_config.ARCHITECTURE, gemma3_config.NESTED_ARCHITECTURE),
    config_class=gemma3_config.Gemma3Config,
    model_path="matformer.models.gemma3.model:Gemma3LM",
    task=CAUSAL_LM, layer_prefix=lm_shapes.LAYER_PREFIX, nested=gemma3_shapes.nested_axis,
    embedding_prefixes=(lm_shapes.EMBEDDING, lm_shapes.LM_HEAD),
    tied={lm_shapes.LM_HEAD: lm_shapes.EMBEDDING},
    shapes=gemma3_shapes.expected_shapes, counts=gemma3_shapes.parameter_counts,
    summary=gemma3_shapes.summary, info=gemma3_shapes.info,
    title="Gemma 3", docs="docs/FAMILIES.md", gguf_arch="gemma3",
))
