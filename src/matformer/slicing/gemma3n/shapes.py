"""The tensors of a Gemma 3n text model (names relative to the text prefix) and their shapes,
from the config alone, and the parameter groups `info` reports.

Names and shapes follow transformers' modeling_gemma3n. KV-shared layers need no k_proj, v_proj
or k_norm: transformers 5 leaves them out when saving, Google's published checkpoints carry them
(unused); both are accepted. `v_norm` has no weight (an RMSNorm without scale).

Parameter groups (what `effective` counts, matching Google's published "# Effective Params" of
the Gemma 3n slicing configs): every text-model tensor except the token embedding
`embed_tokens` (tied to the output head) and the per-layer embedding table
`embed_tokens_per_layer`; the vision and audio towers (`vision_tower`, `embed_vision`,
`audio_tower`, `embed_audio`) are counted apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Shape = tuple[int, ...]

EMBEDDING = "embed_tokens.weight"
PER_LAYER_EMBEDDING = "embed_tokens_per_layer.weight"
PER_LAYER_PROJECTION = "per_layer_model_projection.weight"
KV_ONLY = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")
TOWERS = {"vision": ("model.vision_tower.", "model.embed_vision."),
          "audio": ("model.audio_tower.", "model.embed_audio.")}


def layer_shapes(text: Mapping[str, Any], width: int) -> dict[str, Shape]:
    """Tensors of one decoder layer of FFN `width` (names after `layers.N.`)."""
    h, hp, a, r = (text["hidden_size"], text["hidden_size_per_layer_input"],
                   text["altup_num_inputs"], text["laurel_rank"])
    hd, nh, nkv = text["head_dim"], text["num_attention_heads"], text["num_key_value_heads"]
    out: dict[str, Shape] = {
        "altup.correct_output_scale": (h,),
        "altup.correction_coefs.weight": (a, a),
        "altup.modality_router.weight": (a, h),
        "altup.prediction_coefs.weight": (a * a, a),
        "altup.router_norm.weight": (h,),
        "laurel.linear_left.weight": (r, h),
        "laurel.linear_right.weight": (h, r),
        "laurel.post_laurel_norm.weight": (h,),
        "mlp.gate_proj.weight": (width, h),
        "mlp.up_proj.weight": (width, h),
        "mlp.down_proj.weight": (h, width),
        "per_layer_input_gate.weight": (hp, h),
        "per_layer_projection.weight": (h, hp),
        "self_attn.q_proj.weight": (nh * hd, h),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_proj.weight": (nkv * hd, h),
        "self_attn.v_proj.weight": (nkv * hd, h),
        "self_attn.k_norm.weight": (hd,),
        "self_attn.o_proj.weight": (h, nh * hd),
    }
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "post_per_layer_input_norm"):
        out[f"{norm}.weight"] = (h,)
    return out


def text_shapes(text: Mapping[str, Any], widths: Sequence[int], first_shared: int,
                ) -> tuple[dict[str, Shape], dict[str, Shape]]:
    """(required, optional) tensors of a text model with per-layer `widths`, names relative to
    the text prefix; `optional` holds the unused KV tensors of the shared layers."""
    h, v, hp = text["hidden_size"], text["vocab_size"], text["hidden_size_per_layer_input"]
    n = len(widths)
    required: dict[str, Shape] = {
        EMBEDDING: (v, h),
        PER_LAYER_EMBEDDING: (text["vocab_size_per_layer_input"], n * hp),
        PER_LAYER_PROJECTION: (n * hp, h),
        "per_layer_projection_norm.weight": (hp,),
        "norm.weight": (h,),
    }
    for k in range(text["altup_num_inputs"] - 1):
        required[f"altup_projections.{k}.weight"] = (h, h)
        required[f"altup_unembed_projections.{k}.weight"] = (h, h)
    optional: dict[str, Shape] = {}
    for i, w in enumerate(widths):
        for rest, shape in layer_shapes(text, w).items():
            name = f"layers.{i}.{rest}"
            (optional if i >= first_shared and rest in KV_ONLY else required)[name] = shape
    return required, optional


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def parameter_groups(shapes: Mapping[str, Sequence[int]], prefix: str) -> dict[str, int]:
    """Parameter counts of a whole checkpoint's tensors `shapes` (full names) by group."""
    groups = {"effective": 0, "embedding": 0, "per_layer_embedding": 0, "vision": 0, "audio": 0,
              "other": 0}
    for name, shape in shapes.items():
        n = _numel(shape)
        if name == prefix + EMBEDDING or name == "lm_head.weight":
            groups["embedding"] += n
        elif name == prefix + PER_LAYER_EMBEDDING:
            groups["per_layer_embedding"] += n
        elif name.startswith(prefix):
            groups["effective"] += n
        else:
            tower = next((t for t, pres in TOWERS.items() if name.startswith(pres)), "other")
            groups[tower] += n
    groups["total"] = sum(groups.values())
    return groups
