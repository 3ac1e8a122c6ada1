"""A `.gguf` file as a checkpoint source: dequantized into a normal checkpoint folder.

Why a folder: every verb already reads a checkpoint folder (config.json, safetensors, tokenizer
files) through `io.source`; turning the GGUF into one, once, keeps one loading path. The folder
holds what transformers would write for the same model:

- `model.safetensors` (float32 by default): every tensor dequantized with the `gguf` package
  (`io.gguf_reader`), q/k rows put back from llama.cpp's interleaved rope pairs into
  transformers' halves (`io.gguf.unpermute_rope`, the inverse of what our exporter and
  llama.cpp's converter do), named as transformers names them;
- `config.json`: the transformers config rebuilt from the GGUF metadata (sizes, heads, head_dim,
  rope theta, RMS epsilon, vocabulary, context length, tied embeddings when there is no
  `output.weight`, special token ids);
- `tokenizer.json` built from `tokenizer.ggml.*` (byte-level BPE: vocabulary, merges, control
  and user-defined tokens, and the pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names; or a
  SentencePiece-style `llama` vocabulary rebuilt as transformers' GGUF loader does,
  `io.gguf_spm`),
  `tokenizer_config.json` (special tokens, `add_bos_token`, the chat template from
  `tokenizer.chat_template`, the context length), `special_tokens_map.json`,
  `generation_config.json` (BOS, EOS and end-of-turn ids);
- `gguf_source.json`: which file it came from (not a companion: it does not travel on).

`gguf_to_checkpoint(path, out_dir)` writes such a folder where asked (atomically, like every
save, through io.swap and io.safetensors: io.checkpoint imports io.source, which imports this); `gguf_checkpoint(src)` is what `io.source.resolve_source` calls for a `.gguf` SRC (or a
folder holding exactly one `.gguf` and no config.json): the folder in the cache
(`$MATFORMER_CACHE/gguf/` or `~/.cache/matformer/gguf/`), keyed by the file's size, mtime and
a hash of its header, written the first time and reused after.

Architectures are tables (`ARCHITECTURES`): each names its tensors, which ones carry rope
rows, and how its metadata becomes a config: `llama` (also what llama.cpp's converter writes for
Mistral; its window is not in the file), `qwen2` (q/k/v biases) and `qwen3` (q/k norms), the
last two with NEOX rope (rows as transformers has them). Rope scaling is read from
`rope.scaling.*` (linear, yarn) or, for Llama 3's `rope_freqs` tensor, from the transformers
parameters our exporter stores beside it (`matformer.rope_parameters`, checked against the
tensor). Any other architecture, tokenizer model, pre-tokenizer, quantization type or
numerics-changing key (partial rotary, experts, a sliding window, per-layer sizes) is a
one-line refusal that names it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matformer.errors import CheckpointError, ConfigError
from matformer.io.atomic import atomic_write
from matformer.io.files import read_json
from matformer.io.gguf import ROPE_FREQS, ROPE_PARAMETERS_KEY, unpermute_rope
from matformer.io.gguf_reader import ArrayRef, GGUFFile, pread_exact
from matformer.io.gguf_spm import build_spm_tokenizer
from matformer.io.layout import CONFIG_NAME, INDEX_NAME
from matformer.io.manifest import MANIFEST_NAME
from matformer.io.safetensors import write_file
from matformer.io.swap import atomic_folder
from matformer.models.lm.rope import RopeSpec, llama3_factors
from matformer.models.registry import config_from_dict, expected_shapes

SUFFIX = ".gguf"
MARKER = "gguf_source.json"
CONVERTER_VERSION = 2
"""Part of the cache key: bump it when the conversion changes what it writes."""
DTYPES = ("float32", "float16")

# ---- which SRC is a GGUF ------------------------------------------------------------------------


def gguf_file_in(p: Path) -> Path | None:
    """The GGUF file SRC `p` names: `p` itself (a `.gguf` file), or the one `.gguf` in folder
    `p` when it has no config.json (and is no multi-tier repo); else None."""
    if p.suffix.lower() == SUFFIX and os.path.isfile(p):
        return p
    if not os.path.isdir(p) or (p / CONFIG_NAME).exists() or (p / MANIFEST_NAME).exists():
        return None
    try:
        found = sorted(e.name for e in os.scandir(p)
                       if e.name.lower().endswith(SUFFIX) and e.is_file())
    except OSError:
        return None
    if len(found) > 1:
        raise CheckpointError(f"{p}: holds {len(found)} .gguf files ({', '.join(found[:4])}"
                              f"{', ...' if len(found) > 4 else ''}) and no config.json; name "
                              f"the one to read")
    return p / found[0] if found else None


# ---- architecture tables ------------------------------------------------------------------------

ROPE_HEADS, ROPE_KV_HEADS = "heads", "kv_heads"


@dataclass(frozen=True)
class Architecture:
    """How one llama.cpp architecture becomes a transformers model."""

    name: str
    config: Callable[[GGUFFile, str], dict[str, Any]]
    """(file, architecture) -> the transformers config.json object (sizes checked)."""
    top: dict[str, str]
    """GGUF name -> transformers name, outside the layers."""
    layer: dict[str, str]
    """`blk.N.` suffix -> `model.layers.N.` suffix."""
    optional: frozenset[str]
    """GGUF names that may be absent (`output.weight`: tied embeddings)."""
    rope_rows: dict[str, str]
    """Layer suffix -> ROPE_HEADS / ROPE_KV_HEADS: rows llama.cpp interleaved per head."""
    shapes: Callable[[dict[str, Any]], dict[str, tuple[int, ...]]]
    """config -> {transformers name: shape} of every tensor."""
    norm_shift: frozenset[str] = frozenset()
    """Layer suffixes and top names of norms llama.cpp stores as 1 + w (Gemma's (1 + w)
    RMSNorm): 1 is subtracted on reading."""


def _meta(f: GGUFFile, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """A metadata value of the expected type, or a one-line error naming the key."""
    if key not in f.metadata:
        if default is ...:
            raise CheckpointError(f"{f.path}: metadata {key!r} is missing")
        return default
    value = f.metadata[key]
    if isinstance(value, ArrayRef):
        raise CheckpointError(f"{f.path}: metadata {key!r} is an array (per-layer sizes?) where "
                              f"one value is expected; matformer reads GGUFs whose layers all "
                              f"have the same sizes")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise CheckpointError(f"{f.path}: metadata {key!r}={value!r} has the wrong type")
    return value


def _positive(f: GGUFFile, key: str, default: Any = ...) -> int:
    v = _meta(f, key, int, default)
    if v is not None and not 1 <= v < 1 << 31:
        raise CheckpointError(f"{f.path}: metadata {key!r}={v} is out of range")
    return v


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back as it (1e-05, not
    9.999999747378752e-06): what the original config said."""
    return float(str(np.float32(x)))


def _refuse_numerics(f: GGUFFile, arch: str) -> None:
    """Keys that change what the model computes and that this reader does not implement."""
    for key in (f"{arch}.expert_count", f"{arch}.attention.sliding_window",
                f"{arch}.attn_logit_softcapping", f"{arch}.final_logit_softcapping"):
        if f.metadata.get(key) not in (None, 0):
            raise CheckpointError(f"{f.path}: metadata {key}={f.metadata[key]!r} is not "
                                  f"supported (a plain {arch} has none)")
    splits = f.metadata.get("split.count")
    if splits not in (None, 0, 1):
        raise CheckpointError(f"{f.path}: one part of a GGUF split in {splits}; merge the parts "
                              f"first (llama-gguf-split --merge)")


def _rope_parameters(f: GGUFFile, arch: str, theta: float, head_dim: int) -> dict[str, Any]:
    """transformers' rope_parameters from the rope scaling metadata (see the module
    docstring); a scaling this reader cannot state exactly is a one-line refusal."""
    k = f"{arch}.rope.scaling."
    kind = f.metadata.get(k + "type")
    factor = f.metadata.get(k + "factor")
    ours = f.metadata.get(ROPE_PARAMETERS_KEY)
    if ours is not None:
        try:
            rope = json.loads(ours) if isinstance(ours, str) else None
        except ValueError:
            rope = None
        if not isinstance(rope, dict) or rope.get("rope_type") not in ("linear", "yarn",
                                                                       "llama3", "dynamic"):
            raise CheckpointError(f"{f.path}: metadata {ROPE_PARAMETERS_KEY}={ours!r} is not a "
                                  f"rope_parameters object matformer wrote")
        _check_rope_agrees(f, k, rope, theta, head_dim)
        return {**rope, "rope_theta": _f32(theta)}
    if ROPE_FREQS in f.tensors:
        raise CheckpointError(f"{f.path}: tensor {ROPE_FREQS!r} (Llama 3 rope scaling) without "
                              f"the parameters that made it; matformer cannot state its "
                              f"llama3 rope_parameters exactly")
    if kind in (None, "none") and factor in (None, 0, 1, 0.0, 1.0):
        return {"rope_type": "default", "rope_theta": _f32(theta)}
    if kind == "linear" and isinstance(factor, (int, float)) and factor > 0:
        return {"rope_type": "linear", "rope_theta": _f32(theta), "factor": _f32(factor)}
    if kind == "yarn" and isinstance(factor, (int, float)) and factor > 0:
        out = {"rope_type": "yarn", "rope_theta": _f32(theta), "factor": _f32(factor),
               "original_max_position_embeddings": _positive(f, k + "original_context_length")}
        for gk, hk in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                       ("yarn_beta_slow", "beta_slow")):
            if f.metadata.get(k + gk) is not None:
                out[hk] = _f32(_meta(f, k + gk, (float, int)))
        return out
    raise CheckpointError(f"{f.path}: {k}type={kind!r} (factor {factor!r}): this rope scaling "
                          f"is not supported")


def _check_rope_agrees(f: GGUFFile, k: str, rope: dict[str, Any], theta: float,
                       head_dim: int) -> None:
    """Our stored rope_parameters describe what llama.cpp reads from the same file."""
    kind = rope["rope_type"]
    gkind = f.metadata.get(k + "type")
    agrees = (gkind in (None, "none") if kind in ("llama3", "dynamic") else gkind == kind)
    if kind == "llama3":
        have = f.read(ROPE_FREQS) if ROPE_FREQS in f.tensors else None
        params = {x: v for x, v in rope.items() if x not in ("rope_type", "rope_theta")}
        want = np.asarray(llama3_factors(RopeSpec("llama3", float(theta), params), head_dim),
                          dtype=np.float32)
        agrees = agrees and have is not None and np.allclose(have, want, rtol=1e-6, atol=0)
    if not agrees:
        raise CheckpointError(f"{f.path}: metadata {ROPE_PARAMETERS_KEY} ({kind}) disagrees "
                              f"with the file's rope scaling ({k}type={gkind!r}); the file was "
                              f"changed after matformer wrote it")


def _llama_block_config(model_type: str, architecture: str, *, bias: str = "none"
                        ) -> Callable[[GGUFFile, str], dict[str, Any]]:
    """The config reader of a llama.cpp architecture on the Llama block. `bias`: 'none', or
    'qkv' (q/k/v biases always: Qwen2, nothing to write), or 'tensors' (attention_bias when the
    file has them: Llama, Qwen3). Qwen3's q/k norms follow from its model_type."""

    def read(f: GGUFFile, arch: str) -> dict[str, Any]:
        c = _llama_config(f, arch)
        c["model_type"], c["architectures"] = model_type, [architecture]
        if model_type != "llama":
            for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
                c.pop(key)
        elif "blk.0.attn_output.bias" in f.tensors and "blk.0.attn_q.bias" not in f.tensors:
            raise CheckpointError(f"{f.path}: an o_proj bias without q/k/v biases is no "
                                  f"transformers Llama (attention_bias gives all four)")
        if bias == "tensors":
            c["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
        if model_type in ("qwen2", "qwen3"):
            c.update(use_sliding_window=False, sliding_window=None, max_window_layers=0)
        return c

    return read


def _llama_config(f: GGUFFile, arch: str) -> dict[str, Any]:
    _refuse_numerics(f, arch)
    return _llama_shaped(f, arch)


def _llama_shaped(f: GGUFFile, arch: str) -> dict[str, Any]:
    """The Llama config of the sizes, heads, rope, epsilon and tokens of `arch`'s metadata (the
    numerics keys not checked: `_refuse_numerics`, or the family's own reader)."""
    k = f"{arch}."
    layers = _positive(f, k + "block_count")
    hidden = _positive(f, k + "embedding_length")
    ffn = _positive(f, k + "feed_forward_length")
    heads = _positive(f, k + "attention.head_count")
    kv_heads = _positive(f, k + "attention.head_count_kv", heads)
    rope_dim = _positive(f, k + "rope.dimension_count", None)
    head_dim = _positive(f, k + "attention.key_length", None) or rope_dim or hidden // heads
    value_dim = _positive(f, k + "attention.value_length", head_dim)
    if value_dim != head_dim or heads % kv_heads or head_dim % 2:
        raise CheckpointError(f"{f.path}: heads {heads}, KV heads {kv_heads}, key length "
                              f"{head_dim}, value length {value_dim}: not a Llama attention")
    if rope_dim is not None and rope_dim != head_dim:
        raise CheckpointError(f"{f.path}: {k}rope.dimension_count={rope_dim} is not the head "
                              f"size {head_dim}: partial rotary embeddings are not supported")
    eps = _meta(f, k + "attention.layer_norm_rms_epsilon", float)
    theta = _meta(f, k + "rope.freq_base", (float, int), 10000.0)
    if not (eps > 0 and theta > 0):
        raise CheckpointError(f"{f.path}: RMS epsilon {eps} and rope base {theta} must be > 0")
    rope = _rope_parameters(f, arch, theta, head_dim)
    vocab = _vocab_size(f, k)
    ids = _special_ids(f, vocab)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": _positive(f, k + "context_length", 2048),
        "rms_norm_eps": _f32(eps),
        "rope_theta": _f32(theta),
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
    }


def _vocab_size(f: GGUFFile, k: str) -> int:
    emb = f.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise CheckpointError(f"{f.path}: no 2-D tensor 'token_embd.weight' (the embedding)")
    rows = emb.shape[0]
    declared = _positive(f, k + "vocab_size", None)
    tokens = f.count("tokenizer.ggml.tokens")
    for what, n in ((k + "vocab_size", declared), ("tokenizer.ggml.tokens", tokens)):
        if n is not None and n != rows:
            raise CheckpointError(f"{f.path}: {what} has {n} entries but token_embd.weight has "
                                  f"{rows} rows")
    return rows


_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                 "pad": "padding_token_id", "eot": "eot_token_id", "eom": "eom_token_id"}


def _special_ids(f: GGUFFile, vocab: int) -> dict[str, int]:
    out = {}
    for name, key in _SPECIAL_KEYS.items():
        v = _meta(f, "tokenizer.ggml." + key, int, None)
        if v is None:
            continue
        if not 0 <= v < vocab:
            raise CheckpointError(f"{f.path}: tokenizer.ggml.{key}={v} is outside the "
                                  f"vocabulary of {vocab}")
        out[name] = v
    return out


def _llama_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the config's model, as our own shape arithmetic names it (biases and
    q/k norms included where the family has them)."""
    out = dict(expected_shapes(config_from_dict(dict(c), source="config rebuilt from GGUF")))
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])  # tied: optional
    return out


_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
          "attn_v.weight": "self_attn.v_proj.weight",
          "attn_output.weight": "self_attn.o_proj.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
          "ffn_down.weight": "mlp.down_proj.weight"}
_BIASES = {"attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
           "attn_v.bias": "self_attn.v_proj.bias"}
_O_BIAS = {"attn_output.bias": "self_attn.o_proj.bias"}
_QK_NORMS = {"attn_q_norm.weight": "self_attn.q_norm.weight",
             "attn_k_norm.weight": "self_attn.k_norm.weight"}

LLAMA = Architecture(
    name="llama",
    config=_llama_block_config("llama", "LlamaForCausalLM", bias="tensors"),
    top=_TOP, layer={**_LAYER, **_BIASES, **_O_BIAS},
    optional=frozenset({"output.weight", ROPE_FREQS}),
    rope_rows={"attn_q.weight": ROPE_HEADS, "attn_k.weight": ROPE_KV_HEADS,
               "attn_q.bias": ROPE_HEADS, "attn_k.bias": ROPE_KV_HEADS},
    shapes=_llama_shapes,
)
QWEN2 = Architecture(
    name="qwen2",
    config=_llama_block_config("qwen2", "Qwen2ForCausalLM", bias="qkv"),
    top=_TOP, layer={**_LAYER, **_BIASES},
    optional=frozenset({"output.weight", ROPE_FREQS}),
    rope_rows={},  # NEOX rope: llama.cpp rotates halves, as transformers does
    shapes=_llama_shapes,
)
QWEN3 = Architecture(
    name="qwen3",
    config=_llama_block_config("qwen3", "Qwen3ForCausalLM", bias="tensors"),
    top=_TOP, layer={**_LAYER, **_BIASES, **_O_BIAS, **_QK_NORMS},
    optional=frozenset({"output.weight", ROPE_FREQS}),
    rope_rows={},
    shapes=_llama_shapes,
)


# Gemma 3 (llama.cpp's `gemma3`, as its converter and `matformer export` write it): the Llama
# tensors plus q/k norms and the post-attention / post-feedforward norms, every norm stored as
# 1 + w, q/k rows not interleaved (llama.cpp ropes Gemma in the NEOX layout).
GEMMA3_SWA_PATTERN = 6
"""llama.cpp's default when the file has no sliding_window_pattern: every 6th layer global."""
GEMMA3_27B_LAYERS = 62


def _gemma3_config(f: GGUFFile, arch: str) -> dict[str, Any]:
    k = f"{arch}."
    for key in (k + "expert_count", k + "attn_logit_softcapping"):
        if f.metadata.get(key) not in (None, 0):
            raise CheckpointError(f"{f.path}: metadata {key}={f.metadata[key]!r} is not "
                                  f"supported in Gemma 3")
    if f.metadata.get("split.count") not in (None, 0, 1):
        raise CheckpointError(f"{f.path}: one part of a GGUF split; merge the parts first "
                              f"(llama-gguf-split --merge)")
    scaling = f.metadata.get(k + "rope.scaling.type")
    factor = _meta(f, k + "rope.scaling.factor", (float, int), None)
    if scaling not in (None, "none", "linear"):
        raise CheckpointError(f"{f.path}: {k}rope.scaling.type={scaling!r} is not supported "
                              f"in Gemma 3 (linear only)")
    c = _llama_shaped(f, arch)
    layers = c["num_hidden_layers"]
    window = _positive(f, k + "attention.sliding_window", None) or None
    pattern = f.get(k + "attention.sliding_window_pattern")
    if window is None:
        sliding = [False] * layers
    elif pattern is None or isinstance(pattern, int):
        n = pattern or GEMMA3_SWA_PATTERN  # llama.cpp's set_swa_pattern
        sliding = [i % n < n - 1 for i in range(layers)]
    else:
        sliding = [bool(x) for x in pattern]
        if len(sliding) != layers:
            raise CheckpointError(f"{f.path}: {k}attention.sliding_window_pattern has "
                                  f"{len(sliding)} entries for {layers} layers")
    local = _meta(f, k + "rope.freq_base_swa", (float, int), 10000.0)
    cap = _meta(f, k + "final_logit_softcapping", (float, int), None)
    heads, hd = c["num_attention_heads"], c["head_dim"]
    c.update({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        # llama.cpp's gemma3 attention scale (src/models/gemma3.cpp), as transformers spells it
        "query_pre_attn_scalar": (c["hidden_size"] // heads if layers == GEMMA3_27B_LAYERS
                                  else hd),
        "sliding_window": window,
        "layer_types": ["sliding_attention" if x else "full_attention" for x in sliding],
        "rope_parameters": {
            "full_attention": ({"rope_type": "linear", "factor": _f32(factor),
                                "rope_theta": c["rope_theta"]}
                               if scaling == "linear" and factor not in (None, 0, 1)
                               else {"rope_type": "default", "rope_theta": c["rope_theta"]}),
            "sliding_attention": {"rope_type": "default", "rope_theta": _f32(local)}},
        "final_logit_softcapping": None if not cap else _f32(cap),
        "attn_logit_softcapping": None,
    })
    for key in ("rope_theta", "hidden_act", "mlp_bias", "pretraining_tp"):
        c.pop(key, None)
    return c


GEMMA3 = Architecture(
    name="gemma3",
    config=_gemma3_config,
    top=LLAMA.top,
    layer={"attn_norm.weight": "input_layernorm.weight",
           "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
           "attn_v.weight": "self_attn.v_proj.weight",
           "attn_output.weight": "self_attn.o_proj.weight",
           "attn_q_norm.weight": "self_attn.q_norm.weight",
           "attn_k_norm.weight": "self_attn.k_norm.weight",
           "post_attention_norm.weight": "post_attention_layernorm.weight",
           "ffn_norm.weight": "pre_feedforward_layernorm.weight",
           "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
           "ffn_down.weight": "mlp.down_proj.weight",
           "post_ffw_norm.weight": "post_feedforward_layernorm.weight"},
    optional=frozenset({"output.weight"}),
    rope_rows={},
    shapes=_llama_shapes,  # our shape arithmetic, through the rebuilt Gemma 3 config
    norm_shift=frozenset({"attn_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight",
                          "post_attention_norm.weight", "ffn_norm.weight",
                          "post_ffw_norm.weight", "output_norm.weight"}),
)

ARCHITECTURES: dict[str, Architecture] = {"llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3,
                                          "gemma3": GEMMA3}
"""llama.cpp architecture -> table."""


def architecture_of(f: GGUFFile) -> Architecture:
    arch = _meta(f, "general.architecture", str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported yet "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch]


# ---- tensors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorMap:
    hf: str
    gguf: str
    shape: tuple[int, ...]
    rope_heads: int | None
    """Heads whose rows llama.cpp interleaved (None: no rope rows)."""
    shift: float = 0.0
    """Added on reading (-1 for a norm stored as 1 + w)."""


def plan_tensors(f: GGUFFile, arch: Architecture, config: dict[str, Any]) -> list[TensorMap]:
    """Every transformers tensor with its GGUF source, in transformers' order; every GGUF tensor
    placed, shapes and quantization types checked before anything is read."""
    shapes = arch.shapes(config)
    by_gguf: dict[str, str] = dict(arch.top)
    for n in range(config["num_hidden_layers"]):
        for g, h in arch.layer.items():
            by_gguf[f"blk.{n}.{g}"] = f"model.layers.{n}.{h}"
    for name in f.tensors:
        if name not in by_gguf and name != ROPE_FREQS:  # rope_freqs: read into the config
            raise CheckpointError(f"{f.path}: tensor {name!r} has no place in a {arch.name} model "
                                  f"of {config['num_hidden_layers']} layers; not supported")
    plan = []
    heads = {ROPE_HEADS: config["num_attention_heads"],
             ROPE_KV_HEADS: config["num_key_value_heads"]}
    to_hf = {h: g for g, h in by_gguf.items()}
    for hf, shape in shapes.items():
        g = to_hf[hf]
        info = f.tensors.get(g)
        if info is None:
            if g in arch.optional:
                continue
            raise CheckpointError(f"{f.path}: tensor {g!r} ({hf}) is missing")
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"{f.path}: tensor {g!r} has shape {list(info.shape)}, the "
                                  f"metadata implies {list(shape)} for {hf}")
        f.check_dequantizable(g)
        suffix = g.split(".", 2)[2] if g.startswith("blk.") else None
        kind = arch.rope_rows.get(suffix) if suffix else None
        shift = -1.0 if (suffix or g) in arch.norm_shift else 0.0
        plan.append(TensorMap(hf, g, tuple(shape), heads[kind] if kind else None, shift))
    return plan


def read_tensor(f: GGUFFile, t: TensorMap, dtype: str) -> np.ndarray:
    w = f.read(t.gguf)
    if t.rope_heads is not None:
        w = unpermute_rope(w, t.rope_heads)
    if t.shift:
        w = w + np.float32(t.shift)
    return w.astype(dtype, copy=False)


# ---- tokenizer ----------------------------------------------------------------------------------

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(name: str | None, path: Path) -> Any:
    """tokenizers' pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` (llama-vocab.cpp's split
    regexes, applied before the byte-level mapping)."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=True)  # the GPT-2 split regex
    if name in (None, "gpt-2", "default"):
        return byte_level
    if name == "smollm":  # llama.cpp: "\p{N}" (each digit alone), then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    if name in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                     use_regex=False)])
    raise CheckpointError(f"{path}: tokenizer.ggml.pre={name!r}: this pre-tokenizer is not "
                          f"supported yet (supported: gpt-2, smollm, llama-bpe)")


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level vocabularies are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@dataclass
class TokenizerFiles:
    tokenizer_json: str
    tokenizer_config: dict[str, Any]
    special_tokens_map: dict[str, str]
    generation_config: dict[str, Any]


def _token_types(f: GGUFFile, tokens: list[str]) -> list[int]:
    types = f.get("tokenizer.ggml.token_type")
    if types is None:
        return [1] * len(tokens)
    if isinstance(types, list) or len(types) != len(tokens):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.token_type must be one number per token")
    return [int(t) for t in types.tolist()]


def _spm_backbone(f: GGUFFile) -> tuple[Any, list[str]]:
    """A `llama` (SentencePiece-style) vocabulary as transformers' GGUF loader rebuilds it
    (`io.gguf_spm.build_spm_tokenizer`)."""
    tokens = f.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.tokens must be a string array")
    types = _token_types(f, tokens)
    scores = f.get("tokenizer.ggml.scores")
    if scores is not None:
        if isinstance(scores, list) or len(scores) != len(tokens):
            raise CheckpointError(f"{f.path}: tokenizer.ggml.scores must be one number per token")
        scores = [float(x) for x in scores.tolist()]
    # llama.cpp's default for a `llama` vocabulary is a space prefix
    prefix = bool(_meta(f, "tokenizer.ggml.add_space_prefix", bool, True))
    arch = _meta(f, "general.architecture", str, None)
    return build_spm_tokenizer(f.path, tokens, scores, types, prefix, gemma=arch == "gemma3"), \
        tokens


def _byte_level_backbone(f: GGUFFile, config: dict[str, Any]) -> tuple[Any, list[str]]:
    """A `gpt2` (byte-level BPE) vocabulary: tokens, merges, the pre-tokenizer
    `tokenizer.ggml.pre` names, control and user-defined tokens added."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    pre = _pre_tokenizer(_meta(f, "tokenizer.ggml.pre", str, None), f.path)
    n_merges = f.count("tokenizer.ggml.merges") or 0
    if n_merges > 8 * config["vocab_size"]:  # real files: about one per token (Llama 3: 2.2)
        raise CheckpointError(f"{f.path}: tokenizer.ggml.merges has {n_merges} entries for a "
                              f"vocabulary of {config['vocab_size']}: corrupt")
    tokens = f.get("tokenizer.ggml.tokens")
    merges = f.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.tokens and tokenizer.ggml.merges must "
                              f"be string arrays")
    types = _token_types(f, tokens)
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{f.path}: merge {m!r} is not two tokens")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) stay whole and are special; one spelled outside the byte
    # alphabet is a llama.cpp mislabel that would grow the vocabulary (as transformers skips it).
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True)
               if ty == CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True)
            if ty == USER_DEFINED and t in vocab]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    return tok, tokens


def build_tokenizer(f: GGUFFile, config: dict[str, Any]) -> TokenizerFiles:
    """tokenizer.json and its companions from `tokenizer.ggml.*` (byte-level BPE, or a
    SentencePiece-style `llama` vocabulary)."""
    from tokenizers import processors

    model = _meta(f, "tokenizer.ggml.model", str, None)
    if model == "llama":
        tok, tokens = _spm_backbone(f)
    elif model == "gpt2":
        tok, tokens = _byte_level_backbone(f, config)
    else:
        raise CheckpointError(f"{f.path}: tokenizer.ggml.model={model!r}: only byte-level BPE "
                              f"('gpt2') and SentencePiece-style ('llama') tokenizers can be "
                              f"rebuilt yet")
    vocab_n = config["vocab_size"]
    ids = _special_ids(f, vocab_n)
    # llama.cpp (and transformers' loader) add BOS to a `llama` vocabulary that does not say
    add_bos = bool(_meta(f, "tokenizer.ggml.add_bos_token", bool, model == "llama"))
    add_eos = bool(_meta(f, "tokenizer.ggml.add_eos_token", bool, False))
    names = {k: tokens[v] for k, v in ids.items()}
    if (add_bos and "bos" not in names) or (add_eos and "eos" not in names):
        raise CheckpointError(f"{f.path}: add_bos_token/add_eos_token set without a BOS/EOS id")
    if add_bos or add_eos:  # llama.cpp adds them around every text
        around = [k for k, on in (("bos", add_bos), ("eos", add_eos)) if on]
        first = ([names["bos"]] if add_bos else []) + ["$A"] + ([names["eos"]] if add_eos else [])
        second = [p if p != "$A" else "$B:1" for p in first]
        tok.post_processor = processors.TemplateProcessing(
            single=first, pair=first + second,
            special_tokens=list({names[k]: ids[k] for k in around}.items()))
    elif model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials_map = {f"{k}_token": names[k] for k in ("bos", "eos", "unk", "pad") if k in names}
    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials_map,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = _meta(f, "tokenizer.chat_template", str, None)
    if template is not None:
        tcfg["chat_template"] = template
    eos_ids = [ids[k] for k in ("eos", "eot", "eom") if k in ids]
    eos_ids = list(dict.fromkeys(eos_ids))
    gen: dict[str, Any] = {"_from_model_config": False}
    if "bos" in ids:
        gen["bos_token_id"] = ids["bos"]
    if eos_ids:
        gen["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if "pad" in ids:
        gen["pad_token_id"] = ids["pad"]
    return TokenizerFiles(tok.to_str(pretty=True), tcfg, specials_map, gen)


# ---- writing ------------------------------------------------------------------------------------


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: a GGUF is written as one of {', '.join(DTYPES)}")
    return dtype


def header_sha256(f: GGUFFile) -> str:
    return hashlib.sha256(pread_exact(f.fd, f.header_bytes, 0, f.path)).hexdigest()


def _provenance(f: GGUFFile, dtype: str) -> dict[str, Any]:
    return {"gguf": str(f.path.resolve()), "size": f.size, "mtime_ns": f.stat.st_mtime_ns,
            "header_sha256": header_sha256(f), "dtype": dtype,
            "converter_version": CONVERTER_VERSION,
            "architecture": f.metadata.get("general.architecture"),
            "tokenizer_pre": _meta(f, "tokenizer.ggml.pre", str, None),
            "name": f.metadata.get("general.name")}


WEIGHTS = "model.safetensors"
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json")


def _replaced_files(folder: Path) -> set[str]:
    """Names in an existing output folder that belong to the checkpoint written over it (files
    others put there are kept; see io.swap)."""
    names = {CONFIG_NAME, INDEX_NAME, MARKER, *COMPANIONS}
    with contextlib.suppress(OSError):
        names.update(e.name for e in os.scandir(folder) if e.name.endswith(".safetensors"))
    return names


def _write(f: GGUFFile, out_dir: str | os.PathLike, dtype: str) -> Path:
    """Check everything (architecture, config, tensors, types, tokenizer), then write the folder
    in place of `out_dir` atomically (io.swap): one safetensors file written tensor by tensor
    (peak memory: one dequantized tensor), the tokenizer files, config.json last."""
    arch = architecture_of(f)
    config = arch.config(f, arch.name)
    config["torch_dtype"] = dtype
    config_from_dict(dict(config), source=f"{f.path} (config rebuilt from its metadata)")
    plan = plan_tensors(f, arch, config)
    tk = build_tokenizer(f, config)
    by_name = {t.hf: t for t in plan}
    st = {"float32": "F32", "float16": "F16"}[dtype]
    specs = [(t.hf, st, t.shape) for t in plan]
    files = {
        "tokenizer.json": tk.tokenizer_json.encode(),
        "tokenizer_config.json": _json(tk.tokenizer_config),
        "special_tokens_map.json": _json(tk.special_tokens_map),
        "generation_config.json": _json(tk.generation_config),
        MARKER: _json(_provenance(f, dtype)),
    }

    def fill(tmp: Path) -> set[str]:
        for name, data in files.items():
            atomic_write(tmp / name, data)
        write_file(tmp / WEIGHTS, specs, lambda name: read_tensor(f, by_name[name], dtype),
                   metadata={"format": "pt"})
        atomic_write(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return {*files, WEIGHTS, CONFIG_NAME}

    return atomic_folder(out_dir, fill, _replaced_files)


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def gguf_pre_name(folder: str | os.PathLike) -> str | None:
    """The GGUF's own `tokenizer.ggml.pre` recorded in a folder converted from it (its
    `gguf_source.json`), or None (another folder, or an older conversion): what `export` names
    the pre-tokenizer when it writes such a source back to GGUF."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        value = read_json(path).get("tokenizer_pre")
    except (CheckpointError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def gguf_to_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike,
                       dtype: str = "float32") -> Path:
    """Dequantize the GGUF at `path` into a checkpoint folder `out_dir` (safetensors in `dtype`,
    config.json, tokenizer files; see the module docstring), atomically. Returns the folder."""
    _check_dtype(dtype)
    with GGUFFile(path) as f:
        return _write(f, out_dir, dtype)


def cache_root() -> Path:
    """Where GGUF sources are materialised: $MATFORMER_CACHE/gguf or ~/.cache/matformer/gguf."""
    env = os.environ.get("MATFORMER_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "matformer") / "gguf"


def gguf_checkpoint(p: str | os.PathLike, *, dtype: str = "float32",
                    cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The checkpoint folder of GGUF SRC `p` (see `gguf_file_in`), converted into the cache the
    first time and reused after; None when `p` is not a GGUF SRC."""
    src = gguf_file_in(Path(p))
    if src is None:
        return None
    _check_dtype(dtype)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    with GGUFFile(src) as f:
        key = hashlib.sha256(json.dumps(
            [CONVERTER_VERSION, dtype, f.size, f.stat.st_mtime_ns, header_sha256(f)]).encode())
        folder = root / f"{src.stem[:80]}-{key.hexdigest()[:20]}"
        if (folder / MARKER).is_file() and (folder / CONFIG_NAME).is_file():
            return folder
        print(f"matformer: reading {src} into {folder} (once; later runs reuse it)",
              file=sys.stderr, flush=True)
        return _write(f, folder, dtype)
