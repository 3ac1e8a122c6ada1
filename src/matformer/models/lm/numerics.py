"""Which config.json keys change what a model computes, and what matformer does with each.

A Hugging Face config carries keys that change the logits (the FFN activation, biases, rotary
scaling, a sliding attention window, soft-capping, ...). A loader that quietly ignored one would
build a *different* model from the same weights: a Llama with `hidden_act: gelu_pytorch_tanh`
converted and then computed other logits. So every config any path reads (load, convert, train
--init-from, --distill, slice, export: they all go through `MatFormerConfig.from_dict`) passes
`check_numerics_keys` first: each key is implemented exactly, harmless (listed with the reason),
or refused with a one-line ConfigError naming the key and the value.

`tests/test_numerics_keys.py` enumerates every key transformers' LlamaConfig and MistralConfig
define and fails on one that none of the tables below covers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from matformer.errors import ConfigError

MODEL_TYPES = (None, "llama", "mistral")
"""model_type values whose layout and math are ours (Mistral is Llama plus `sliding_window`).
Others (qwen2: q/k/v biases; gemma: scaled embeddings; ...) differ in ways no key records."""

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
    "rope_parameters": "rope_type 'default' with rope_theta (others refused)",
    "tie_word_embeddings": "lm_head shares the embedding",
    "hidden_act": f"one of {ACTIVATIONS} (others refused)",
    "model_type": f"one of {MODEL_TYPES[1:]} (others refused)",
    "sliding_window": "null, or no shorter than max_position_embeddings (never reached)",
    "use_sliding_window": "false (Qwen-style switch; true refused)",
    "attention_bias": "false (no bias tensors; true refused)",
    "mlp_bias": "false (no bias tensors; true refused)",
    "rope_scaling": "null or type 'default' (scaled RoPE refused)",
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
    "partial_rotary_factor": "partial rotary embeddings",
    "qk_norm": "query/key norms",
    "use_qk_norm": "query/key norms",
    "no_rope_layers": "layers without rotary embeddings",
    "layer_types": "per-layer attention types",
    "max_window_layers": "per-layer sliding windows",
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


def _no_bias(v: Any, d: dict[str, Any]) -> str | None:
    return None if v is None or v is False else "bias tensors are not implemented"


def _act(v: Any, d: dict[str, Any]) -> str | None:
    return None if v in ACTIVATIONS else f"implemented: {', '.join(ACTIVATIONS)}"


def _model_type(v: Any, d: dict[str, Any]) -> str | None:
    return None if v in MODEL_TYPES else f"implemented: {', '.join(map(str, MODEL_TYPES[1:]))}"


def _sliding(v: Any, d: dict[str, Any]) -> str | None:
    if v is None:
        return None
    limit = d.get("max_position_embeddings")
    if (isinstance(v, int) and not isinstance(v, bool) and isinstance(limit, int)
            and v >= limit):
        return None  # a window at least as long as any sequence never masks anything
    return (f"sliding-window attention is not implemented (a window shorter than "
            f"max_position_embeddings={limit!r} changes the logits)")


def _use_sliding(v: Any, d: dict[str, Any]) -> str | None:
    return None if v in (None, False) else "sliding-window attention is not implemented"


def _rope(v: Any, d: dict[str, Any]) -> str | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        return "expected an object"
    kind = v.get("rope_type", v.get("type", "default"))
    if kind != "default":
        return f"rope_type={kind!r}: only 'default' rotary embeddings are implemented"
    other = sorted(set(v) - {"rope_type", "type", "rope_theta"})
    if other:
        return f"keys {other} are not implemented"
    return None


_CHECKS: dict[str, Callable[[Any, dict[str, Any]], str | None]] = {
    "hidden_act": _act,
    "model_type": _model_type,
    "sliding_window": _sliding,
    "use_sliding_window": _use_sliding,
    "attention_bias": _no_bias,
    "mlp_bias": _no_bias,
    "rope_scaling": _rope,
    "rope_parameters": _rope,
}


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_numerics_keys(d: dict[str, Any], source: str = "config.json") -> None:
    """A ConfigError naming the first key of `d` that would change the logits in a way matformer
    does not compute (see the module docstring); nothing for implemented or harmless keys."""
    for key, check in _CHECKS.items():
        if key in d:
            why = check(d[key], d)
            if why is not None:
                raise ConfigError(f"{source}: {key}={_show(d[key])} is not supported ({why}); "
                                  f"matformer would compute different logits than transformers")
    for key, what in _REFUSED_PRESENT.items():
        v = d.get(key)
        if key in d and not any(v is n or (type(v) is type(n) and v == n) for n in _NEUTRAL):
            raise ConfigError(f"{source}: {key}={_show(v)} is not supported ({what}); matformer "
                              f"would compute different logits than transformers")


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
