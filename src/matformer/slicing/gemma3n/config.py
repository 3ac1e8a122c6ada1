"""Reading a Hugging Face Gemma 3n config.json without transformers (so `info` stays light).

Two layouts exist: the multimodal `Gemma3nForConditionalGeneration` (model_type `gemma3n`, the
text config nested under `text_config`, text weights under `model.language_model.`, vision and
audio towers beside it) and the text-only `Gemma3nForCausalLM` (model_type `gemma3n_text`,
weights under `model.`). Keys a config.json leaves out take transformers' Gemma3nTextConfig
defaults, which this module mirrors (a sliced config then writes them explicitly).

KV sharing (transformers' `Gemma3nTextConfig.kv_sharing_modes`): the last `num_kv_shared_layers`
layers compute no keys or values; each reuses those of the last layer *of its attention type*
before that range (the "store" layer of the type).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matformer.errors import CheckpointError, ConfigError
from matformer.io.files import is_regular, read_json
from matformer.io.layout import CONFIG_NAME
from matformer.models.registry import GEMMA3N_MODEL_TYPES

MULTIMODAL_TYPE, TEXT_TYPE = GEMMA3N_MODEL_TYPES
LAYER_TYPES = ("sliding_attention", "full_attention")

# transformers' Gemma3nTextConfig defaults for the keys this module reads.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_400,
    "hidden_size": 2048,
    "intermediate_size": 16_384,
    "num_hidden_layers": 35,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256,
    "altup_num_inputs": 4,
    "num_kv_shared_layers": 15,
    "laurel_rank": 64,
    "tie_word_embeddings": True,
}


def _default_layer_types(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]


def _default_sparsity(n: int) -> list[float]:
    sparse = 10 if n > 10 else 0
    return [0.95] * sparse + [0.0] * (n - sparse)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass
class Gemma3nConfig:
    """A Gemma 3n config.json: the whole object and a normalised view of its text part."""

    path: Path
    raw: dict[str, Any]  # the file as read (written back with only the sliced keys changed)
    multimodal: bool
    text: dict[str, Any]  # the text config with defaults filled in and lists made explicit

    @property
    def prefix(self) -> str:
        """Name prefix of the text model's tensors."""
        return "model.language_model." if self.multimodal else "model."

    @property
    def num_layers(self) -> int:
        return self.text["num_hidden_layers"]

    @property
    def widths(self) -> list[int]:
        return list(self.text["intermediate_size"])

    @property
    def layer_types(self) -> list[str]:
        return list(self.text["layer_types"])

    @property
    def num_kv_shared(self) -> int:
        return self.text["num_kv_shared_layers"]

    @property
    def first_shared(self) -> int:
        """Index of the first layer that reuses KV (== num_layers when none does)."""
        return self.num_layers - self.num_kv_shared

    def kv_stores(self) -> dict[str, int]:
        """Attention type -> the layer whose keys/values the shared layers of that type reuse."""
        if self.num_kv_shared == 0:
            return {}
        types = self.layer_types
        return {t: max(i for i in range(self.first_shared) if types[i] == t) for t in set(types)}

    def kv_source(self, layer: int) -> int | None:
        """The layer whose KV `layer` reuses, or None when it computes its own."""
        if layer < self.first_shared:
            return None
        return self.kv_stores()[self.layer_types[layer]]

    def with_text(self, **changes: Any) -> dict[str, Any]:
        """The whole config.json object with `changes` applied to its text part."""
        out = copy.deepcopy(self.raw)
        text = out["text_config"] if self.multimodal else out
        text.update(copy.deepcopy(changes))
        return out


def read_config(folder: str | Path) -> Gemma3nConfig:
    """Read and validate `folder/config.json` as a Gemma 3n config (a regular file of strict,
    size-capped JSON, as io reads every metadata file)."""
    path = Path(folder) / CONFIG_NAME
    if not is_regular(path):
        raise CheckpointError(f"{path}: no config.json beside the weights")
    raw = read_json(path, error=ConfigError)
    if not isinstance(raw, dict) or raw.get("model_type") not in (MULTIMODAL_TYPE, TEXT_TYPE):
        got = raw.get("model_type") if isinstance(raw, dict) else None
        raise ConfigError(f"{path}: model_type {got!r} is not {MULTIMODAL_TYPE!r} or {TEXT_TYPE!r}")
    multimodal = raw["model_type"] == MULTIMODAL_TYPE
    text_raw = raw.get("text_config") if multimodal else raw
    if not isinstance(text_raw, dict):
        raise ConfigError(f"{path}: a {MULTIMODAL_TYPE!r} config needs a 'text_config' object")
    where = f"{path}: {'text_config.' if multimodal else ''}"
    return Gemma3nConfig(path, raw, multimodal, normalise(text_raw, where))


def normalise(text_raw: dict[str, Any], where: str) -> dict[str, Any]:
    text = {**TEXT_DEFAULTS, **{k: v for k, v in text_raw.items() if v is not None}}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size_per_layer_input",
                "hidden_size_per_layer_input", "altup_num_inputs", "laurel_rank"):
        if not _positive_int(text[key]):
            raise ConfigError(f"{where}{key} must be a positive integer, got {text[key]!r}")
    n = text["num_hidden_layers"]
    widths = text["intermediate_size"]
    if _positive_int(widths):
        widths = [widths] * n
    if not (isinstance(widths, list) and len(widths) == n and all(_positive_int(w) for w in widths)):
        raise ConfigError(f"{where}intermediate_size must be a positive integer or {n} of them "
                          f"(one per layer), got {widths!r}")
    text["intermediate_size"] = list(widths)
    types = text.get("layer_types") or _default_layer_types(n)
    if not (isinstance(types, list) and len(types) == n and all(t in LAYER_TYPES for t in types)):
        raise ConfigError(f"{where}layer_types must list {n} of {LAYER_TYPES}, got {types!r}")
    text["layer_types"] = list(types)
    sp = text.get("activation_sparsity_pattern")
    sp = _default_sparsity(n) if sp is None else sp
    if isinstance(sp, (int, float)) and not isinstance(sp, bool):
        sp = [float(sp)] * n
    if not (isinstance(sp, list) and len(sp) == n and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in sp)):
        raise ConfigError(f"{where}activation_sparsity_pattern must list {n} values in [0, 1), "
                          f"got {sp!r}")
    text["activation_sparsity_pattern"] = list(sp)
    shared = text["num_kv_shared_layers"]
    if not (isinstance(shared, int) and not isinstance(shared, bool) and 0 <= shared < n):
        raise ConfigError(f"{where}num_kv_shared_layers must be an integer in 0..{n - 1}, got "
                          f"{shared!r}")
    if shared and set(types[n - shared:]) - set(types[:n - shared]):
        raise ConfigError(f"{where}the KV-shared layers use attention types "
                          f"{sorted(set(types[n - shared:]))} but the layers before them only "
                          f"{sorted(set(types[:n - shared]))}: nothing to read KV from")
    return text
