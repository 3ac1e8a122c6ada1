"""Which config.json keys change what a model computes, and what matformer does with each.

A Hugging Face config carries keys that change the logits (the FFN activation, biases, rotary
scaling, a sliding attention window, soft-capping, ...). A loader that quietly ignored one would
build a *different* model from the same weights: a Llama with `hidden_act: gelu_pytorch_tanh`
converted and then computed other logits. So every config any path reads (load, convert, train
--init-from, --distill, slice, export: they all go through `MatFormerConfig.from_dict`) passes
`check_numerics_keys` first: each key is implemented exactly, harmless (listed with the reason),
or refused with a one-line ConfigError naming the key and the value.

The families built on the Llama block (Llama, Mistral, Qwen2, Qwen3: `models/<family>/`) differ
in a few exact places, each a `Dialect` field: which model_types it reads, whether and where a
sliding window applies, which attention biases it has, and per-head q/k norms. The keys are the
same; what a key means is the dialect's (Mistral's `sliding_window` masks every layer, a Qwen's
only when `use_sliding_window` and then by `layer_types`; Llama ignores it in transformers and
is refused here when it would mask).

`tests/models/test_numerics_keys.py` enumerates every key transformers' LlamaConfig,
MistralConfig, Qwen2Config and Qwen3Config define and fails on one no table below covers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from matformer.errors import ConfigError
from matformer.models.lm.rope import read_rope


@dataclass(frozen=True)
class Dialect:
    """How one family on the Llama block reads the numerics keys (see the module docstring)."""

    model_types: tuple[str | None, ...]
    """config.json `model_type`s it reads (None: a config without one)."""
    sliding: str = "none"
    """'none': no window (a `sliding_window` that would mask is refused); 'all': every layer
    masks with `sliding_window` (Mistral); 'layer_types': layers marked 'sliding_attention'
    mask when `use_sliding_window` (Qwen2/Qwen3)."""
    bias: str = "config"
    """'config': `attention_bias` gives q/k/v/o biases (Llama, Qwen3); 'qkv': q/k/v biases
    always, o none (Qwen2); 'none': never (Mistral; a true `attention_bias` is refused)."""
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys before rope (Qwen3's q_norm/k_norm)."""


LLAMA = Dialect(model_types=(None, "llama"))
"""transformers' Llama (and a config without model_type)."""

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")
"""`hidden_act` values computed bit-for-bit as transformers' ACT2FN computes them (the gated
FFN is act(gate_proj x) * up_proj x either way). gelu_new/gelu_fast/quick_gelu use other formulas
(and gelu_python an erf formula) and are refused rather than approximated."""

IMPLEMENTED: dict[str, str] = {
    "vocab_size": "embedding/lm_head rows",
    "hidden_size": "model width",
    "intermediate_size": "FFN width (per layer for Mix'n'Match)",
    "num_hidden_layers": "layers",
    "num_attention_heads": "query heads",
    "num_key_value_heads": "grouped-query attention",
    "head_dim": "attention head size (may differ from hidden_size / heads)",
    "max_position_embeddings": "longest context",
    "rms_norm_eps": "RMSNorm epsilon",
    "rope_theta": "rotary base",
    "rope_parameters": "rope_type default/linear/dynamic/yarn/llama3 (models.lm.rope; others "
                       "refused)",
    "rope_scaling": "the older name of rope_parameters (read the same way)",
    "original_max_position_embeddings": "yarn/llama3 rope: overrides the nested key",
    "tie_word_embeddings": "lm_head shares the embedding",
    "hidden_act": f"one of {ACTIVATIONS} (others refused)",
    "model_type": "the family (models.registry); each family reads its own",
    "sliding_window": "Mistral: every layer; Qwen2/3: the 'sliding_attention' layers; Llama: "
                      "null or no shorter than max_position_embeddings (never reached)",
    "use_sliding_window": "Qwen2/3: turns layer_types' windows on; others: false only",
    "max_window_layers": "Qwen2/3: first layer with a window when layer_types is not given",
    "layer_types": "Qwen2/3: full_attention / sliding_attention per layer; others: "
                   "full_attention only",
    "attention_bias": "Llama/Qwen3: q/k/v/o biases; Qwen2 ignores it (q/k/v biases always); "
                      "Mistral: false only",
    "mlp_bias": "false (no FFN bias tensors; true refused)",
}

HARMLESS: dict[str, str] = {
    "bos_token_id": "generation metadata",
    "eos_token_id": "generation metadata",
    "pad_token_id": "generation metadata",
    "torch_dtype": "storage dtype (recorded, converted on load)",
    "dtype": "storage dtype (recorded, converted on load)",
    "initializer_range": "only initialises fresh weights",
    "architectures": "class name for transformers",
    "transformers_version": "writer version",
    "_name_or_path": "where transformers loaded it from",
    "use_cache": "KV caching does not change logits",
    "output_attentions": "extra outputs only",
    "output_hidden_states": "extra outputs only",
    "return_dict": "output container only",
    "chunk_size_feed_forward": "chunked FFN: the same math",
    "is_encoder_decoder": "false for causal LMs (checked by the architecture)",
    "id2label": "classification-head labels; no such head",
    "label2id": "classification-head labels; no such head",
    "problem_type": "classification-head loss; no such head",
    "pretraining_tp": "transformers 5 ignores it (a split matmul: the same math)",
    "attention_dropout": "dropout: inactive at inference; matformer trains without it",
    "tokenizer_class": "tokenizer metadata",
    "auto_map": "remote-code class names (never executed)",
    "matformer_base_intermediate_size": "MatFormer nesting metadata",
    "matformer_tier": "MatFormer nesting metadata",
    "matformer_base_num_key_value_heads": "MatFormer nesting metadata",
}

_REFUSED_PRESENT: dict[str, str] = {
    "quantization_config": "quantized weights",
    "attn_logit_softcapping": "attention soft-capping",
    "final_logit_softcapping": "logit soft-capping",
    "logits_scaling": "scaled logits",
    "logit_scale": "scaled logits",
    "embedding_multiplier": "scaled embeddings",
    "residual_multiplier": "scaled residuals",
    "attention_multiplier": "scaled attention",
    "query_pre_attn_scalar": "another attention scale",
    "qk_norm": "query/key norms",
    "use_qk_norm": "query/key norms",
    "no_rope_layers": "layers without rotary embeddings",
    "norm_eps": "a norm epsilon under another name than rms_norm_eps",
    "layer_norm_eps": "a LayerNorm, not RMSNorm",
    "layer_norm_epsilon": "a LayerNorm, not RMSNorm",
    "use_bias": "bias tensors",
    "bias": "bias tensors",
    "parallel_attn": "parallel attention/FFN blocks",
    "num_experts": "mixture of experts",
    "num_local_experts": "mixture of experts",
}
"""Keys of other families that change numerics; refused when set to anything but null/false/0
(their neutral value), so a config that merely names them neutrally still loads."""

_NEUTRAL = (None, False, 0, 0.0, 1, 1.0, [], {})


def _no_bias(v: Any, d: dict[str, Any], dialect: Dialect) -> str | None:
    return None if v is None or v is False else "bias tensors are not implemented"


def _attention_bias(v: Any, d: dict[str, Any], dialect: Dialect) -> str | None:
    if v is None or isinstance(v, bool) and (v is False or dialect.bias != "none"):
        return None
    if not isinstance(v, bool):
        return "expected true or false"
    return "this family's attention has no biases"


def _act(v: Any, d: dict[str, Any], dialect: Dialect) -> str | None:
    return None if v in ACTIVATIONS else f"implemented: {', '.join(ACTIVATIONS)}"


def _model_type(v: Any, d: dict[str, Any], dialect: Dialect) -> str | None:
    if v in dialect.model_types:
        return None
    return f"this family reads {', '.join(map(str, dialect.model_types))}"


def _window(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _sliding(v: Any, d: dict[str, Any], dialect: Dialect) -> str | None:
    if v is None:
        return None
    if dialect.sliding != "none":
        return None if _window(v) else "expected a positive integer or null"
    limit = d.get("max_position_embeddings")
    if _window(v) and isinstance(limit, int) and v >= limit:
        return None  # a window at least as long as any sequence never masks anything
    return (f"transformers' Llama has no sliding window (a window shorter than "
            f"max_position_embeddings={limit!r} would mask); use model_type 'mistral' if the "
            f"weights were trained with one")


def _use_sliding(v: Any, d: dict[str, Any], dialect: Dialect) -> str | None:
    if v in (None, False) or (v is True and dialect.sliding == "layer_types"):
        return None
    return "this family has no sliding-window switch"


def _max_window_layers(v: Any, d: dict[str, Any], dialect: Dialect) -> str | None:
    if dialect.sliding == "layer_types":
        ok = v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 0
        return None if ok else "expected a non-negative integer"
    return None if v in (None, 0) else "per-layer sliding windows are not this family's"


LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_types(v: Any, d: dict[str, Any], dialect: Dialect) -> str | None:
    if v is None:
        return None
    if not isinstance(v, list) or any(t not in LAYER_TYPES for t in v):
        return f"expected a list of {' / '.join(LAYER_TYPES)}"
    if dialect.sliding != "layer_types" and any(t != "full_attention" for t in v):
        return "per-layer sliding windows are not this family's"
    return None


def _rope(v: Any, d: dict[str, Any], dialect: Dialect) -> str | None:
    return None  # read, and refused with the key named, by models.lm.rope.read_rope


_CHECKS: dict[str, Callable[[Any, dict[str, Any], Dialect], str | None]] = {
    "hidden_act": _act,
    "model_type": _model_type,
    "sliding_window": _sliding,
    "use_sliding_window": _use_sliding,
    "max_window_layers": _max_window_layers,
    "layer_types": _layer_types,
    "attention_bias": _attention_bias,
    "mlp_bias": _no_bias,
    "rope_scaling": _rope,
    "rope_parameters": _rope,
}


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_numerics_keys(d: dict[str, Any], source: str = "config.json",
                        dialect: Dialect = LLAMA) -> None:
    """A ConfigError naming the first key of `d` that would change the logits in a way matformer
    does not compute for a family of `dialect` (see the module docstring); nothing for
    implemented or harmless keys."""
    for key, check in _CHECKS.items():
        if key in d:
            why = check(d[key], d, dialect)
            if why is not None:
                raise ConfigError(f"{source}: {key}={_show(d[key])} is not supported ({why}); "
                                  f"matformer would compute different logits than transformers")
    for key, what in _REFUSED_PRESENT.items():
        v = d.get(key)
        if key in d and not any(v is n or (type(v) is type(n) and v == n) for n in _NEUTRAL):
            raise ConfigError(f"{source}: {key}={_show(v)} is not supported ({what}); matformer "
                              f"would compute different logits than transformers")
    read_rope(d, source)


def layer_windows(d: dict[str, Any], n_layers: int, dialect: Dialect,
                  source: str = "config.json") -> list[int | None]:
    """The attention window of each layer (None: full causal attention), as the family's
    transformers class masks: Mistral every layer by `sliding_window`; a Qwen the layers
    `layer_types` marks 'sliding_attention' (default: from `max_window_layers` on) when
    `use_sliding_window`; none otherwise."""
    w = d.get("sliding_window")
    if dialect.sliding == "all":
        return [w] * n_layers
    if dialect.sliding != "layer_types" or not d.get("use_sliding_window") or w is None:
        return [None] * n_layers
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers")
        first = 28 if first is None else first
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers:
        raise ConfigError(f"{source}: layer_types has {len(types)} entries for "
                          f"num_hidden_layers={n_layers}")
    return [w if t == "sliding_attention" else None for t in types]


def hidden_act(config: Any) -> str:
    """The FFN activation of a MatFormerConfig (its `hidden_act`, kept in `extra`; default silu)."""
    act = getattr(config, "extra", {}).get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(f"hidden_act={_show(act)} is not supported (implemented: "
                          f"{', '.join(ACTIVATIONS)})")
    return act


def activation(name: str) -> Callable[[Any], Any]:
    """The torch function of an ACTIVATIONS name, the one transformers' ACT2FN[name] calls."""
    import functools

    import torch.nn.functional as F

    table = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
             "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}
    if name not in table:
        raise ConfigError(f"hidden_act={_show(name)} is not supported (implemented: "
                          f"{', '.join(ACTIVATIONS)})")
    return table[name]
