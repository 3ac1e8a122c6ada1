"""Model families: which config, architecture arithmetic and model a config.json describes.

Two families share the nesting machinery (tiers, views, checkpoints, training objectives):
- the language model (`MatFormerConfig` / `MatFormerLM`, transformers' Llama layout), the default;
- MatViT (`MatViTConfig` / `MatViT`, transformers' ViT layout), chosen by `model_type: "vit"`.

A third family is read but not loaded: Hugging Face Gemma 3n (`model_type` `gemma3n` or
`gemma3n_text`), which `matformer.slicing.gemma3n` slices and describes from its own config reader;
`family_of` names it so the resolver can fetch its files and the verbs can hand it over, and
asking for its config as one of ours is a one-line error.

Loaders and writers ask here instead of naming one family, so detection has one rule. Torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matformer.errors import ConfigError
from matformer.models.lm import shapes
from matformer.models.lm.config import MatFormerConfig
from matformer.models.vit import config as V
from matformer.models.vit.config import MatViTConfig

Config = MatFormerConfig | MatViTConfig
LM, VIT, GEMMA3N = "lm", "vit", "gemma3n"
GEMMA3N_MODEL_TYPES = ("gemma3n", "gemma3n_text")
"""Gemma3nForConditionalGeneration (multimodal) and Gemma3nForCausalLM (text-only)."""


def is_vit(config_dict: Any) -> bool:
    return V.is_vit_config(config_dict)


def family_of(config_dict: Any) -> str:
    """LM, VIT or GEMMA3N for a parsed config.json (anything unrecognised: LM, whose reader then
    says what is wrong)."""
    if isinstance(config_dict, dict) and config_dict.get("model_type") in GEMMA3N_MODEL_TYPES:
        return GEMMA3N
    return VIT if is_vit(config_dict) else LM


def check_loadable(family: str, source: str) -> None:
    """The one-line error for a family matformer reads but does not load or run."""
    if family == GEMMA3N:
        raise ConfigError(f"{source}: a Hugging Face Gemma 3n checkpoint; matformer slices and "
                          f"describes it (`matformer slice`, `matformer info`, docs/GEMMA3N.md) "
                          f"but does not load or run it")


def config_from_dict(d: Any, source: str = "config.json") -> Config:
    """The config a parsed config.json describes (`model_type: "vit"`: a MatViT; else the LM)."""
    check_loadable(family_of(d), source)
    if is_vit(d):
        return MatViTConfig.from_dict(d, source=source)
    return MatFormerConfig.from_dict(d, source=source)


def read_config_file(path: str | os.PathLike) -> Config:
    """A checkpoint's config.json, as the config of its family (errors name the file)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        d = None  # the family's own reader reports what is wrong with the file
    check_loadable(family_of(d), os.fspath(path))
    return (MatViTConfig if is_vit(d) else MatFormerConfig).from_json_file(path)


def expected_shapes(config: Config, widths: Sequence[int] | None = None,
                    kv_heads: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of `config` at `widths`/`kv_heads` (default: as stored)."""
    if isinstance(config, MatViTConfig):
        return V.expected_shapes(config, None if widths is None else list(widths),
                                 None if kv_heads is None else list(kv_heads))
    return shapes.expected_shapes(config, widths, kv_heads)


def parameter_counts(config: Config, widths: Sequence[int] | None = None,
                     kv_heads: Sequence[int] | None = None) -> dict[str, int]:
    """Parameter counts of `config` at `widths`/`kv_heads`; both families report `embedding`,
    `non_embedding` and `total` (MatViT also its classifier `head`)."""
    if isinstance(config, MatViTConfig):
        return V.parameter_counts(config, None if widths is None else list(widths),
                                  None if kv_heads is None else list(kv_heads))
    return shapes.parameter_counts(config, widths, kv_heads)


def non_embedding_parameters(config: Config, widths: Sequence[int] | None = None,
                             kv_heads: Sequence[int] | None = None) -> int:
    """The size the paper compares widths by, in either family."""
    return parameter_counts(config, widths, kv_heads)["non_embedding"]
