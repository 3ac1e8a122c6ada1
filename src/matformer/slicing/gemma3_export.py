"""GGUF export of a Gemma 3 text checkpoint: llama.cpp's `gemma3` architecture, written as
llama.cpp's own converter writes one (convert_hf_to_gguf.py `Gemma3Model`).

- tensor names from gguf's `gemma3` map (`attn_q_norm`, `post_attention_norm`, `ffn_norm` for
  the pre-feedforward norm, `post_ffw_norm`, ...); q/k rows are not permuted (llama.cpp ropes
  Gemma with the NEOX layout, rotating halves as transformers does);
- every norm weight is stored as 1 + w (llama.cpp's RMSNorm multiplies by the weight);
- metadata: the sliding window, which layers slide (a per-layer bool array, so any
  `layer_types` loads, not only llama.cpp's default every-6th-global pattern), the sliding
  layers' rope base, the global layers' linear rope scaling, final-logit soft-capping.

What llama.cpp's gemma3 graph cannot compute is refused with one line, before anything is
written: per-layer FFN widths or head counts (it builds every layer at layer 0's sizes: export a
uniform tier, `--tier N` / `--kv-heads G`), an attention scale other than the one llama.cpp
derives (1/sqrt(head_dim); 1/sqrt(hidden/heads) for a 62-layer model), an activation other
than gelu_pytorch_tanh.
"""

from __future__ import annotations

from matformer.errors import ConfigError
from matformer.io.gguf import ModelMeta
from matformer.models.gemma3.config import Gemma3Config
from matformer.models.gemma3.shapes import NORMS

ARCH = "gemma3"
LLAMA_CPP_27B_LAYERS = 62
"""llama.cpp scales a 62-layer Gemma 3 (27B) by 1/sqrt(hidden / heads), others by
1/sqrt(head_dim) (src/models/gemma3.cpp)."""


def check_exportable(config: Gemma3Config, widths: list[int], kv_heads: list[int]) -> None:
    """One-line refusals for what llama.cpp's gemma3 graph would compute differently."""
    if len(set(widths)) != 1 or len(set(kv_heads)) != 1:
        raise ConfigError(
            f"per-layer FFN widths {widths} / KV heads {kv_heads}: llama.cpp's gemma3 graph "
            f"builds every layer at layer 0's sizes, so a Mix'n'Match Gemma 3 does not load; "
            f"export a uniform tier (--tier N, --kv-heads G), or slice the Mix'n'Match model "
            f"(`matformer slice`) for transformers")
    hd = config.head_dim
    assert hd is not None
    heads = kv_heads[0] * config.group_size
    llama_cpp = (config.hidden_size / heads if config.num_hidden_layers == LLAMA_CPP_27B_LAYERS
                 else hd)
    if float(config.query_pre_attn_scalar) != float(llama_cpp):
        raise ConfigError(
            f"query_pre_attn_scalar={config.query_pre_attn_scalar:g}: llama.cpp's gemma3 graph "
            f"scales attention by 1/sqrt({llama_cpp:g}) for this shape, so the GGUF would "
            f"compute different logits; export is possible when they agree")
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise ConfigError(f"hidden_activation={config.hidden_activation!r}: llama.cpp's gemma3 "
                          f"graph runs gelu_pytorch_tanh only")


def gemma3_meta(config: Gemma3Config, widths: list[int], kv_heads: list[int] | None,
                name: str) -> ModelMeta:
    """The GGUF metadata of a uniform width / head count of a Gemma 3 text model (refusing,
    `check_exportable`, what llama.cpp would compute differently)."""
    hd = config.head_dim
    assert hd is not None and config.layer_types is not None
    kv_heads = config.layer_kv_heads if kv_heads is None else list(kv_heads)
    check_exportable(config, list(widths), kv_heads)
    extra: dict[str, object] = {}
    sliding = [t == "sliding_attention" for t in config.layer_types]
    if any(sliding):
        assert config.sliding_window is not None
        extra.update(sliding_window=config.sliding_window, sliding_window_pattern=sliding,
                     rope_freq_base_swa=config.rope_local_base_freq)
    if config.rope_scaling_factor != 1.0:
        import gguf

        extra.update(rope_scaling_type=gguf.RopeScalingType.LINEAR,
                     rope_scaling_factor=config.rope_scaling_factor)
    if config.final_logit_softcapping is not None:
        extra["final_logit_softcapping"] = float(config.final_logit_softcapping)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    return ModelMeta(name=name, context_length=config.max_position_embeddings,
                     hidden_size=config.hidden_size, ffn_widths=list(widths),
                     heads=[g * config.group_size for g in kv_heads], kv_heads=kv_heads,
                     head_dim=hd, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
                     vocab_size=config.vocab_size, bos_token_id=config.bos_token_id,
                     eos_token_id=eos, pad_token_id=config.pad_token_id, family_arch=ARCH,
                     extra=extra)


def tensor_order(config: Gemma3Config) -> list[str]:
    """The source tensors written, in llama.cpp's converter's order (a tied lm_head is not:
    llama.cpp reuses token_embd as the output)."""
    order = ["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        order += [f"model.layers.{i}.{t}.weight" for t in (
            "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
            "post_attention_layernorm", "pre_feedforward_layernorm", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "post_feedforward_layernorm")]
    order.append("model.norm.weight")
    if not config.tie_word_embeddings:
        order.append("lm_head.weight")
    return order


NORM_SHIFT = 1.0
"""Added to every norm weight: llama.cpp's RMSNorm multiplies by the stored weight."""
_NORMS = tuple(f"{x}.weight" for x in (*NORMS, "q_norm", "k_norm", "model.norm"))


def is_norm(name: str) -> bool:
    """A (1 + w) norm: written whole (never nested) with `NORM_SHIFT` added."""
    return name.endswith(_NORMS)
