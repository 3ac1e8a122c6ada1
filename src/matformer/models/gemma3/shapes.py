"""Architecture arithmetic of a `Gemma3Config`, without torch: the tensors a checkpoint holds
(transformers' `Gemma3ForCausalLM` names and shapes) and the parameter counts at any per-layer
widths and KV heads.

The names are Llama's plus four per-layer tensors: `self_attn.q_norm`/`k_norm` (one [head_dim]
weight each, shared by every head, so not nested: a cut keeps them whole) and the
`pre_feedforward_layernorm`/`post_feedforward_layernorm`. The nested tensors are Llama's
(`models.lm.shapes.nested_axis`): gate/up rows and down columns by FFN neuron, q/k/v rows and o
columns by KV group. A 262K vocabulary makes the embedding most of a small Gemma 3's parameters,
so the counts always split embedding from non-embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

from matformer.models.gemma3.config import Gemma3Config
from matformer.models.lm.shapes import (
    LAYER_PREFIX,
    decoder_shapes,
    split_counts,
)
from matformer.models.lm.shapes import nested_axis as nested_axis

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
         "post_feedforward_layernorm")


def layer_shapes(config: Gemma3Config, index: int, width: int,
                 kv_heads: int | None = None) -> dict[str, tuple[int, ...]]:
    """Tensors of decoder layer `index` storing FFN `width` and `kv_heads` KV heads (default:
    as stored), by full name, in transformers' order."""
    h, hd = config.hidden_size, config.head_dim
    assert hd is not None
    nkv = config.layer_kv_heads[index] if kv_heads is None else kv_heads
    nh = nkv * config.group_size
    pre = f"{LAYER_PREFIX}{index}."
    out = {
        pre + "self_attn.q_proj.weight": (nh * hd, h),
        pre + "self_attn.k_proj.weight": (nkv * hd, h),
        pre + "self_attn.v_proj.weight": (nkv * hd, h),
        pre + "self_attn.o_proj.weight": (h, nh * hd),
        pre + "self_attn.q_norm.weight": (hd,),
        pre + "self_attn.k_norm.weight": (hd,),
        pre + "mlp.gate_proj.weight": (width, h),
        pre + "mlp.up_proj.weight": (width, h),
        pre + "mlp.down_proj.weight": (h, width),
    }
    out.update({f"{pre}{n}.weight": (h,) for n in NORMS})
    return out


def expected_shapes(config: Gemma3Config, widths: Sequence[int] | None = None,
                    kv_heads: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of `config` at per-layer `widths` / `kv_heads` (default:
    as stored; fewer widths than layers describe a model with layers dropped): the Llama
    layout's (`models.lm.shapes.decoder_shapes`) with Gemma 3's layers."""
    return decoder_shapes(config, layer_shapes, widths, kv_heads)


def parameter_counts(config: Gemma3Config, widths: Sequence[int] | None = None,
                     kv_heads: Sequence[int] | None = None) -> dict[str, int]:
    """{'embedding', 'non_embedding', 'total'} at `widths`/`kv_heads` (a tied lm_head counted
    once): the embedding (262K x hidden in the released models) is reported apart, since the
    nested widths only change the rest."""
    return split_counts(expected_shapes(config, widths, kv_heads))


def summary(config: Gemma3Config) -> str:
    """One line for `matformer info`."""
    assert config.layer_types is not None
    n_sliding = sum(t == "sliding_attention" for t in config.layer_types)
    scale = (f", global rope x{config.rope_scaling_factor:g} linear"
             if config.rope_scaling_factor != 1.0 else "")
    emb = parameter_counts(config)
    return (f"Gemma 3 text: vocab {config.vocab_size} (embedding {emb['embedding']:,} of "
            f"{emb['total']:,} parameters), {n_sliding} sliding-window layers (window "
            f"{config.sliding_window}, rope base {config.rope_local_base_freq:g}) and "
            f"{config.num_hidden_layers - n_sliding} global (rope base {config.rope_theta:g}"
            f"{scale})")


def info(config: Gemma3Config) -> dict[str, object]:
    """Family keys of `checkpoint_info`."""
    return {"vocab_size": config.vocab_size, "model_type": "gemma3_text",
            "layer_types": list(config.layer_types or []),
            "sliding_window": config.sliding_window,
            "rope_theta": config.rope_theta, "rope_local_base_freq": config.rope_local_base_freq,
            "rope_scaling_factor": config.rope_scaling_factor,
            "query_pre_attn_scalar": config.query_pre_attn_scalar,
            "final_logit_softcapping": config.final_logit_softcapping,
            "max_position_embeddings": config.max_position_embeddings}
