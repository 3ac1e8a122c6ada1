"""Architecture arithmetic of a `MatFormerConfig`, without torch: the tensors a checkpoint holds
(transformers' Llama names and shapes) and the parameter counts at any per-layer widths and
KV head counts (the two elastic axes), and the KV-cache bytes per token at any head counts.

The model, the checkpoint validator, the slicer, training and evaluation all count from here, so
"how many parameters at these widths" and "what shape is this tensor" have one answer.
`format_count` / `parse_count` are the human spelling of those counts ("984K", "120M").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from matformer.errors import ConfigError
from matformer.models.lm.config import MatFormerConfig

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
LAYER_PREFIX = "model.layers."
"""Per-layer tensors are named LAYER_PREFIX + index + "." + the rest (transformers' Llama)."""

_NESTED = re.compile(r"^model\.layers\.\d+\.(mlp\.(?:gate_proj|up_proj|down_proj)|"
                     r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj))\.weight$")
_NESTED_BIAS = re.compile(r"^model\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj)\.bias$")


def nested_axis(name: str) -> tuple[str, int] | None:
    """How parameter `name` nests: ("ffn", 0) rows of gate/up_proj, ("ffn", 1) columns of
    down_proj, ("heads", 0) rows of q/k/v_proj, ("heads", 1) columns of o_proj; None: not
    nested (embeddings, norms, lm_head, o_proj's bias). q/k/v biases nest with their rows
    ("heads", 0); Qwen3's q_norm/k_norm weigh each position of every head alike, so a cut keeps
    them whole."""
    if _NESTED_BIAS.match(name):
        return "heads", 0
    m = _NESTED.match(name)
    if m is None:
        return None
    part = m.group(1)
    axis = "ffn" if part.startswith("mlp.") else "heads"
    return axis, 1 if part.endswith(("down_proj", "o_proj")) else 0


def _widths(config: MatFormerConfig, widths: Sequence[int] | None) -> list[int]:
    return config.layer_widths if widths is None else [int(w) for w in widths]


def _kv_heads(config: MatFormerConfig, n: int, kv_heads: Sequence[int] | None) -> list[int]:
    """Per-layer KV heads for `n` layers: as given, else the stored ones (of the first n layers
    when layers are dropped)."""
    if kv_heads is not None:
        hl = [int(g) for g in kv_heads]
        if len(hl) != n:
            raise ConfigError(f"got {len(hl)} per-layer KV head counts for {n} layers")
        return hl
    return config.layer_kv_heads[:n]


def layer_shapes(config: MatFormerConfig, index: int, width: int,
                 kv_heads: int | None = None) -> dict[str, tuple[int, ...]]:
    """Tensors of decoder layer `index` storing FFN `width` and `kv_heads` KV heads (default: the
    heads config stores in that layer), by full name. Heads nest by KV group: g KV heads keep
    g * r query heads (r = config.group_size)."""
    h, hd = config.hidden_size, config.head_dim
    assert hd is not None  # set by MatFormerConfig.__post_init__
    nkv = config.layer_kv_heads[index] if kv_heads is None else kv_heads
    nh = nkv * config.group_size
    pre = f"{LAYER_PREFIX}{index}."
    out = {pre + "self_attn.q_proj.weight": (nh * hd, h)}
    if config.qkv_bias:  # Qwen2 always, Llama/Qwen3 with attention_bias: nested like their rows
        out[pre + "self_attn.q_proj.bias"] = (nh * hd,)
    out[pre + "self_attn.k_proj.weight"] = (nkv * hd, h)
    if config.qkv_bias:
        out[pre + "self_attn.k_proj.bias"] = (nkv * hd,)
    out[pre + "self_attn.v_proj.weight"] = (nkv * hd, h)
    if config.qkv_bias:
        out[pre + "self_attn.v_proj.bias"] = (nkv * hd,)
    out[pre + "self_attn.o_proj.weight"] = (h, nh * hd)
    if config.o_bias:
        out[pre + "self_attn.o_proj.bias"] = (h,)
    if config.qk_norm:  # Qwen3: one weight over head_dim, shared by every head
        out[pre + "self_attn.q_norm.weight"] = (hd,)
        out[pre + "self_attn.k_norm.weight"] = (hd,)
    out.update({
        pre + "mlp.gate_proj.weight": (width, h),
        pre + "mlp.up_proj.weight": (width, h),
        pre + "mlp.down_proj.weight": (h, width),
        pre + "input_layernorm.weight": (h,),
        pre + "post_attention_layernorm.weight": (h,),
    })
    return out


def expected_shapes(config: MatFormerConfig, widths: Sequence[int] | None = None,
                    kv_heads: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of `config` and its shape, in the model's order. `widths`
    (default: the stored widths) gives one FFN width per layer, `kv_heads` (default: the stored
    heads) one KV head count per layer; fewer widths than the config has layers describe a model
    with layers dropped (numbered 0..len(widths)-1)."""
    return decoder_shapes(config, layer_shapes, widths, kv_heads)


def decoder_shapes(config: Any, layer: Callable[[Any, int, int, int], dict[str, tuple[int, ...]]],
                   widths: Sequence[int] | None = None, kv_heads: Sequence[int] | None = None
                   ) -> dict[str, tuple[int, ...]]:
    """`expected_shapes` of any decoder in the Llama layout (embedding, layers, final norm, an
    untied lm_head), its family's tensors per layer given by `layer(config, index, width, kv)`:
    the Llama block's `layer_shapes`, or Gemma 3's with its extra norms."""
    h, v = config.hidden_size, config.vocab_size
    ws = _widths(config, widths)
    hl = _kv_heads(config, len(ws), kv_heads)
    out: dict[str, tuple[int, ...]] = {EMBEDDING: (v, h)}
    for i, (w, g) in enumerate(zip(ws, hl, strict=True)):
        out.update(layer(config, i, w, g))
    out["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        out[LM_HEAD] = (v, h)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parameter_counts(config: MatFormerConfig, widths: Sequence[int] | None = None,
                     kv_heads: Sequence[int] | None = None) -> dict[str, int]:
    """Parameters of the model running (or storing) per-layer `widths` and `kv_heads` (default:
    the stored ones; fewer widths than layers: layers dropped), split into embedding (token
    embedding + an untied lm_head) and non-embedding (everything else). A tied lm_head is
    counted once."""
    return split_counts(expected_shapes(config, widths, kv_heads))


def split_counts(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """{'embedding', 'non_embedding', 'total'} of a checkpoint's tensor shapes: the token
    embedding and an untied lm_head are embedding parameters, everything else is not."""
    counts = {"embedding": 0, "non_embedding": 0}
    for name, shape in shapes.items():
        counts["embedding" if name in (EMBEDDING, LM_HEAD) else "non_embedding"] += _numel(shape)
    counts["total"] = counts["embedding"] + counts["non_embedding"]
    return counts


def non_embedding_parameters(config: MatFormerConfig, widths: Sequence[int] | None = None,
                             kv_heads: Sequence[int] | None = None) -> int:
    """The paper's size measure: non-embedding parameters at per-layer `widths` and `kv_heads`."""
    return parameter_counts(config, widths, kv_heads)["non_embedding"]


def kv_cache_bytes_per_token(config: MatFormerConfig, kv_heads: Sequence[int] | None = None,
                             itemsize: int = 4) -> int:
    """Bytes of KV cache one token of one sequence takes at per-layer `kv_heads` (default: the
    stored heads): keys and values, every layer, `itemsize` bytes per element."""
    hl = _kv_heads(config, config.num_hidden_layers, kv_heads)
    assert config.head_dim is not None
    return 2 * sum(hl) * config.head_dim * itemsize


def format_count(n: float) -> str:
    """A parameter count in three significant digits: 984K, 1.23M, 7.5B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def parse_count(text: str | int) -> int:
    """'120M', '1.5B', '250k', '123456' -> an int (decimal units; what `format_count` writes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)", s)
    if not m:
        raise ConfigError(f"budget must be a parameter count like 120M, 1.5B or 250000, got {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1)) * scale))
