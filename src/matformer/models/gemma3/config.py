"""`Gemma3Config`: a Gemma 3 text model's config.json (transformers' `Gemma3TextConfig`,
`model_type: gemma3_text`) plus the MatFormer keys.

A uniform config is what `Gemma3ForCausalLM.from_pretrained` reads: written with transformers
5's `rope_parameters` (one entry per layer type) and `layer_types`, and read from either that
form or the older one on the Hub (`rope_theta` for the global layers, `rope_local_base_freq` for
the sliding ones, `rope_scaling` on the global layers, `sliding_window_pattern`). The MatFormer
keys are the ones every family has (`models.nesting`): stored FFN width and KV heads (one int or
one per layer), the bases they were cut from, the tier label.

Every key that changes the logits is implemented exactly as transformers 5.25's
modeling_gemma3.py computes it, or refused with one line naming it (`check_keys`): a config that
merely names a feature at its neutral value (`attn_logit_softcapping: null`) loads.

Torch-free (`matformer info` reads it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

from matformer.errors import ConfigError
from matformer.models.lm.numerics import ACTIVATIONS, HARMLESS
from matformer.models.nesting import (
    NESTED_KEYS,
    REWRITTEN,
    NestedConfig,
    check_initializer_range,
    check_positive_int,
    check_positive_number,
    check_token_ids,
    show_value,
)

MODEL_TYPE = "gemma3_text"
ARCHITECTURE = "Gemma3ForCausalLM"
NESTED_ARCHITECTURE = "MatFormerGemma3ForCausalLM"
"""A per-layer (Mix'n'Match or per-layer heads) config: our loader reads it, transformers' not."""
MULTIMODAL_TYPE = "gemma3"
"""`Gemma3ForConditionalGeneration` (text + vision): its `text_config` is read (see
`text_part`)."""

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
DEFAULT_PATTERN = 6
"""transformers' default `sliding_window_pattern`: every 6th layer is global."""
ROPE_TYPES = ("default", "linear")
"""Rotary embeddings computed here (Gemma 3 4B/12B/27B use `linear` on the global layers)."""
MAX_LAYERS = 100_000

# Keys that change what the model computes, beyond the ones read into fields: each implemented
# at one value (its neutral one) and refused at any other.
_NEUTRAL_ONLY: dict[str, tuple[Any, ...]] = {
    "attention_bias": (False, None),
    "attn_logit_softcapping": (None,),  # Gemma 3 has none (llama.cpp's converter asserts it)
    "use_bidirectional_attention": (False, None),
    "quantization_config": (None,),
    "partial_rotary_factor": (None, 1, 1.0),
    "mlp_bias": (False, None),
    "num_experts": (None, 0),
    "embedding_multiplier": (None, 1, 1.0),
    "logit_scale": (None, 1, 1.0),
}
# Keys transformers' Gemma 3 does not read, or reads without a change to the logits.
_IGNORED: dict[str, str] = {
    **HARMLESS,
    "hidden_act": "transformers' Gemma 3 uses hidden_activation, never hidden_act",
    "attention_dropout": "dropout: inactive at inference",
    "sliding_window_pattern": "read into layer_types when layer_types is absent",
    "_sliding_window_pattern": "transformers' copy of sliding_window_pattern",
    "rope_parameters": "read into the rope fields",
    "cache_implementation": "cache choice: the same math",
    "attn_implementation": "attention kernel choice: the same math",
    "model_type": "gemma3_text",
}


def _rope_entry(v: Any, key: str, source: str) -> tuple[float | None, float]:
    """(rope_theta or None, linear factor) of one rope_parameters / rope_scaling entry; any
    other rope type or key is refused naming it."""
    if v is None:
        return None, 1.0
    if not isinstance(v, dict):
        raise ConfigError(f"{source}: {key}={show_value(v)} is not an object")
    kind = v.get("rope_type", v.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: {key}.rope_type={kind!r} is not supported (implemented: "
                          f"{', '.join(ROPE_TYPES)}); matformer would compute different logits "
                          f"than transformers")
    other = sorted(set(v) - {"rope_type", "type", "rope_theta", "factor"})
    if other:
        raise ConfigError(f"{source}: {key} keys {other} are not supported (rope types "
                          f"{', '.join(ROPE_TYPES)} with rope_theta and factor only)")
    factor = v.get("factor", 1.0) if kind == "linear" else 1.0
    check_positive_number(f"{key}.factor", factor)
    theta = v.get("rope_theta")
    if theta is not None:
        check_positive_number(f"{key}.rope_theta", theta)
    return theta, float(factor)


def check_keys(d: dict[str, Any], known: frozenset[str], source: str) -> None:
    """A one-line ConfigError for the first key of `d` that changes the logits in a way not
    implemented: refused at a non-neutral value, or a key of no table (an unknown key could be
    a feature this reader has never heard of)."""
    for key, v in d.items():
        if key in _NEUTRAL_ONLY:
            if not any(v is n or (type(v) is type(n) and v == n) for n in _NEUTRAL_ONLY[key]):
                raise ConfigError(f"{source}: {key}={show_value(v)} is not supported in Gemma 3 "
                                  f"(matformer would compute different logits than "
                                  f"transformers); only {_NEUTRAL_ONLY[key][0]!r} is")
        elif key not in known and key not in _IGNORED:
            raise ConfigError(f"{source}: key {key!r} is not a Gemma 3 text config key matformer "
                              f"knows; it may change the logits, so the config is refused "
                              f"(remove it if it does not)")


@dataclass
class Gemma3Config(NestedConfig):
    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int | list[int] = 9216
    """FFN width stored in the weights: one int, or one int per layer (Mix'n'Match)."""
    num_hidden_layers: int = 26
    num_attention_heads: int | list[int] = 8
    """Query heads stored: one int, or one per layer (heads cut per layer)."""
    num_key_value_heads: int | list[int] | None = 4
    head_dim: int | None = 256
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    """Rotary base of the global (full-attention) layers."""
    rope_local_base_freq: float = 10_000.0
    """Rotary base of the sliding-window layers."""
    rope_scaling_factor: float = 1.0
    """Linear rope scaling of the global layers (1: none): positions / factor."""
    sliding_window: int | None = 4096
    """Keys a sliding layer's query sees: positions q - sliding_window < k <= q."""
    layer_types: list[str] | None = None
    """Per layer 'sliding_attention' or 'full_attention' (None: every 6th layer global)."""
    query_pre_attn_scalar: float = 256
    """Attention scores are scaled by query_pre_attn_scalar ** -0.5."""
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    torch_dtype: str = "float32"
    initializer_range: float = 0.02
    matformer_base_intermediate_size: int | None = None
    matformer_tier: int | None = None
    matformer_base_num_key_value_heads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    NESTED_ARCHITECTURE: ClassVar[str] = NESTED_ARCHITECTURE
    KNOWN: ClassVar[frozenset[str]] = NESTED_KEYS | {
        "vocab_size", "hidden_size", "num_key_value_heads", "max_position_embeddings",
        "rms_norm_eps", "rope_theta", "rope_local_base_freq", "sliding_window", "layer_types",
        "query_pre_attn_scalar", "final_logit_softcapping", "hidden_activation",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}
    REWRITTEN: ClassVar[frozenset[str]] = REWRITTEN | {
        "rope_parameters", "rope_scaling", "sliding_window_pattern", "_sliding_window_pattern"}
    REQUIRED: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_hidden_layers",
                                           "num_attention_heads", "intermediate_size")
    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("rope_theta", "rope_local_base_freq",
                                                 "rope_scaling_factor")

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            check_positive_int(key, getattr(self, key))
        if self.num_hidden_layers > MAX_LAYERS:
            raise ConfigError(f"num_hidden_layers={self.num_hidden_layers} is over the limit of "
                              f"{MAX_LAYERS} layers; the config is damaged or not a model's")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = copy.copy(self.num_attention_heads)
        self._check_scalars()
        self.num_attention_heads = self._per_layer("num_attention_heads")
        self.num_key_value_heads = self._per_layer("num_key_value_heads")
        if self.head_dim is None:
            if not isinstance(self.num_attention_heads, int):
                raise ConfigError("num_attention_heads is a per-layer list; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        ratios = set()
        for i, (nh, g) in enumerate(zip(self.layer_heads, self.layer_kv_heads, strict=True)):
            if nh % g:
                raise ConfigError(f"num_attention_heads={nh} is not divisible by "
                                  f"num_key_value_heads={g} (layer {i})")
            ratios.add(nh // g)
        if len(ratios) > 1:
            raise ConfigError(f"num_attention_heads / num_key_value_heads must be the same in every "
                              f"layer (query heads per KV head), got {sorted(ratios)}")
        self._check_layer_types()
        self.intermediate_size = self._per_layer("intermediate_size")
        self._check_nested()

    def _check_scalars(self) -> None:
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got "
                              f"{show_value(self.tie_word_embeddings)}")
        for key in ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "rope_scaling_factor",
                    "query_pre_attn_scalar"):
            check_positive_number(key, getattr(self, key))
        self.rope_theta = float(self.rope_theta)
        self.rope_local_base_freq = float(self.rope_local_base_freq)
        if self.final_logit_softcapping is not None:
            check_positive_number("final_logit_softcapping", self.final_logit_softcapping)
        if self.sliding_window is not None:
            check_positive_int("sliding_window", self.sliding_window)
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"hidden_activation={show_value(self.hidden_activation)} is not "
                              f"supported (implemented: {', '.join(ACTIVATIONS)})")
        check_initializer_range(self.initializer_range)
        check_token_ids(self)

    def _check_layer_types(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % DEFAULT_PATTERN else FULL for i in range(n)]
        if not isinstance(self.layer_types, list) or len(self.layer_types) != n:
            raise ConfigError(f"layer_types must list one of {LAYER_TYPES} per layer "
                              f"({n}), got {show_value(self.layer_types)}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}]={show_value(t)} is not one of {LAYER_TYPES}")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is "
                              "null; set the window")

    # ---- derived -------------------------------------------------------------------------

    @property
    def layer_heads(self) -> list[int]:
        """Stored query heads of each layer."""
        v = self.num_attention_heads
        return list(v) if isinstance(v, list) else [v] * self.num_hidden_layers

    def is_sliding(self, layer: int) -> bool:
        assert self.layer_types is not None
        return self.layer_types[layer] == SLIDING

    def keep_layers(self, keep: list[int]) -> None:
        """Describe only the source layers `keep` (in order): a slice that drops layers keeps
        each kept layer's attention type."""
        assert self.layer_types is not None
        self.layer_types = [self.layer_types[i] for i in keep]

    # ---- config.json ---------------------------------------------------------------------

    @classmethod
    def _check_input(cls, d: dict[str, Any], source: str) -> None:
        if d.get("model_type") not in (MODEL_TYPE, None):
            raise ConfigError(f"{source}: model_type={d.get('model_type')!r} is not {MODEL_TYPE}")
        check_keys(d, cls.KNOWN | cls.REWRITTEN, source)

    @classmethod
    def _read_special(cls, d: dict[str, Any], kwargs: dict[str, Any], extra: dict[str, Any],
                      source: str) -> None:
        """Rope bases and scaling from transformers 5's `rope_parameters` or the older keys (as
        `Gemma3TextConfig.convert_rope_params_to_dict` reads them: `rope_scaling` updates the
        global layers' entry); `layer_types` from `sliding_window_pattern` when absent."""
        params = d.get("rope_parameters")
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_parameters={show_value(params)} is not an object")
        params = dict(params or {})
        if params and not set(params) <= set(LAYER_TYPES):
            raise ConfigError(f"{source}: rope_parameters must have one entry per layer type "
                              f"{LAYER_TYPES}, got keys {sorted(params)}")
        full = dict(params.get(FULL) or {"rope_type": "default"})
        if d.get("rope_scaling") is not None:
            if not isinstance(d["rope_scaling"], dict):
                raise ConfigError(f"{source}: rope_scaling={show_value(d['rope_scaling'])} is "
                                  f"not an object")
            full.update(d["rope_scaling"])
        theta, factor = _rope_entry(full, "rope_parameters.full_attention", source)
        local, local_factor = _rope_entry(params.get(SLIDING), "rope_parameters.sliding_attention",
                                          source)
        if local_factor != 1.0:
            raise ConfigError(f"{source}: rope scaling on the sliding_attention layers is not "
                              f"supported (transformers' Gemma 3 scales the global layers)")
        if theta is not None:
            kwargs["rope_theta"] = theta
        if local is not None:
            kwargs["rope_local_base_freq"] = local
        kwargs["rope_scaling_factor"] = factor
        if "layer_types" not in kwargs and isinstance(d.get("num_hidden_layers"), int):
            pattern = d.get("sliding_window_pattern", DEFAULT_PATTERN)
            if pattern is None:
                pattern = DEFAULT_PATTERN
            check_positive_int("sliding_window_pattern", pattern)
            n = d["num_hidden_layers"]
            if 0 < n <= MAX_LAYERS:
                kwargs["layer_types"] = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]

    def _write_special(self, d: dict[str, Any]) -> None:
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            full.update(rope_type="linear", factor=self.rope_scaling_factor)
        d["rope_parameters"] = {FULL: full, SLIDING: {"rope_type": "default",
                                                      "rope_theta": self.rope_local_base_freq}}
        d.setdefault("attention_bias", False)
        d.setdefault("attn_logit_softcapping", None)
        d.setdefault("use_bidirectional_attention", False)


def text_part(d: dict[str, Any], source: str) -> dict[str, Any]:
    """The `text_config` of a `Gemma3ForConditionalGeneration` config.json, as a gemma3_text
    config (its tied embeddings are the outer config's `tie_word_embeddings`)."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: a Gemma3ForConditionalGeneration config without a "
                          f"text_config object")
    out = dict(text)
    out["model_type"] = MODEL_TYPE
    out.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", True))
    for key in ("dtype", "torch_dtype"):
        if key in d and "dtype" not in out and "torch_dtype" not in out:
            out[key] = d[key]
    # Hub text_configs leave out what transformers' Gemma3TextConfig defaults fill in.
    defaults = Gemma3Config()
    for key in Gemma3Config.REQUIRED + ("num_key_value_heads", "head_dim"):
        out.setdefault(key, getattr(defaults, key))
    return out

