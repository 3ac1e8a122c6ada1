"""GGUF for llama.cpp: tensor names, metadata, the embedded tokenizer, and a streaming writer.

Conventions follow llama.cpp's own converter (convert_hf_to_gguf.py, `LlamaModel` and
`DeciModel`) so that llama.cpp reads our files exactly as it reads a converted Llama:

- architecture `llama` when every layer has the same FFN width and head counts; `deci` when
  they differ per layer (Mix'n'Match). llama.cpp's `llama` graph builds every layer with the FFN
  width of layer 0, so a per-layer `llama.feed_forward_length` array does not load there;
  `deci` is the same Llama block (RMSNorm, GQA with rope, SwiGLU) with per-layer
  `deci.feed_forward_length`, `deci.attention.head_count` and `.head_count_kv` arrays.
- tensor names from gguf's own map (`token_embd`, `blk.N.attn_q`, ..., `output`); q_proj and
  k_proj rows are permuted per head (`permute_rope`) because llama.cpp applies rope to
  interleaved pairs (x[2i], x[2i+1]) where transformers rotates halves (x[i], x[i + d/2]).
- the tokenizer is the source's byte-level BPE as llama.cpp's `gpt2` model: tokens, types,
  merges, the chat template (tokenizer_config.json's `chat_template` or chat_template.jinja) and
  `tokenizer.ggml.pre`, the name llama.cpp splits text by: found as llama.cpp's converter finds it
  (the hash of the tokenizer's ids for a fixed text, `io.gguf_pre`: `smollm` for SmolLM2), else
  from the pre-tokenizer's structure (`gpt-2` for tokenizers' `ByteLevel(use_regex=True)`, ours),
  else refused (see `read_tokenizer`). A byte-fallback BPE (Llama 2, Mistral v0.1, Gemma:
  `▁`-spelled pieces, `<0xXX>` byte tokens) is written as llama.cpp's SentencePiece-style `llama`
  model instead (tokens, scores, types, add_space_prefix; `io.gguf_spm`).
- types: F32, F16, BF16, Q8_0 and the 4-bit Q4_0 / Q4_1 (the embedding then Q8_0: `FOUR_BIT`);
  norms stay F32, and rows that are not whole blocks fall back to F16 as llama.cpp does.

Writing streams: tensor infos are declared first (shapes and types are known from the plan),
then each tensor's data is produced, converted and written one at a time. The file is written
by the rule of `io.outputs`: to a temporary name in the target folder, renamed over the target
only when complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from matformer.errors import CheckpointError, ConfigError
from matformer.io.files import is_regular, read_bytes, read_json
from matformer.io.gguf_pre import CHKTXT, KNOWN
from matformer.io.gguf_spm import adds_bos_eos, is_spm, space_prefix, spm_vocab
from matformer.io.outputs import Protected, output_temp

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
FOUR_BIT = ("q4_0", "q4_1")
"""4-bit types: the embedding (and a separate output head) is stored as Q8_0 in them, as in the
llama.cpp files they are compared with (SmolLM2's Q4_1: Q8_0 token_embd, Q4_1 blocks): a tied
embedding is also the output head, where 4-bit rounding costs the most. (Q4_K: gguf's Python
package has no quantizer for it.)"""
EMBEDDING_NAMES = ("token_embd.weight", "output.weight")
# The llama.cpp pre-tokenizer whose regex is the one of tokenizers' ByteLevel(use_regex=True):
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
TOKENIZER_PRE = "gpt-2"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the `gguf` package: pip install 'matformer[export]'"
                          ) from None
    return gguf


# ---- names and layout -------------------------------------------------------------------------


ROPE_FREQS = "rope_freqs.weight"
"""llama.cpp's per-frequency divisors: how its converter writes Llama 3 rope scaling."""
ROPE_PARAMETERS_KEY = "matformer.rope_parameters"
"""Our metadata key holding transformers' `rope_parameters` as JSON (llama.cpp ignores it; our
GGUF reader takes it back, since `rope_freqs` alone does not say which llama3 parameters made
it)."""
NEOX_ARCHS = ("qwen2", "qwen3", "gemma3")
"""llama.cpp architectures whose rope rotates halves, as transformers does (no row permutation);
`llama`/`deci` rotate interleaved pairs."""


def gguf_name(hf_name: str, n_layers: int, arch: str = "llama") -> str:
    """The GGUF tensor name of a transformers tensor in llama.cpp architecture `arch` (gguf's
    own name map)."""
    gguf = _gguf()
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "deci": gguf.MODEL_ARCH.DECI,
                  "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
                  "gemma3": gguf.MODEL_ARCH.GEMMA3}[arch]
    name = gguf.get_tensor_name_map(model_arch, n_layers).get_name(
        hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise CheckpointError(f"tensor {hf_name!r} has no GGUF name in a {arch} model")
    return name


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from halves (transformers) to interleaved pairs (llama.cpp)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_rope`."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    return outtype


def tensor_qtype(outtype: str, shape: Sequence[int], name: str = ""):
    """The GGML type a tensor `name` of `shape` is stored as: 1-D tensors (norms) stay F32; 2-D
    ones take `outtype` (4-bit: the embedding and output head Q8_0, see `FOUR_BIT`), except rows
    that are not a whole number of the type's blocks, which fall back to F16 as llama.cpp's
    converter does."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
             "q4_1": Q.Q4_1}[check_outtype(outtype)]
    if outtype in FOUR_BIT and name in EMBEDDING_NAMES:
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def file_type(outtype: str) -> int:
    gguf = _gguf()
    F = gguf.LlamaFileType
    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
                "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0,
                "q4_1": F.MOSTLY_Q4_1}[check_outtype(outtype)])


def _byte_count(shape: Sequence[int], qtype) -> int:
    gguf = _gguf()
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= int(d)
    return n // block * type_size


def encode(data: np.ndarray, qtype) -> np.ndarray:
    """float32 values -> the bytes (or float array) GGUF stores for `qtype`."""
    from gguf.quants import quantize

    return quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


# ---- tokenizer ----------------------------------------------------------------------------------


@dataclass
class TokenizerSpec:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    add_bos: bool
    add_eos: bool
    pre: str = TOKENIZER_PRE
    """llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`)."""
    chat_template: str | None = None
    """tokenizer_config.json's `chat_template` (a string), written as `tokenizer.chat_template`."""
    model: str = "gpt2"
    """llama.cpp's tokenizer model: `gpt2` (byte-level BPE) or `llama` (SentencePiece style,
    `io.gguf_spm`)."""
    scores: list[float] | None = None
    """`llama` only: one score per token (llama.cpp merges the best-scored pair first)."""
    add_space_prefix: bool | None = None
    """`llama` only: llama.cpp prepends a space to the text."""
    unk_id: int | None = None


def _byte_level(pre: Any) -> bool:
    """ByteLevel with the GPT-2 split regex and no prefix space."""
    return (isinstance(pre, dict) and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space"))


def pre_tokenizer_name(pre: Any) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre_tokenizer, or None: "gpt-2"
    for ByteLevel (GPT-2 regex), "smollm" for each digit split off first, then that ByteLevel
    (SmolLM's tokenizer; llama.cpp's `\\p{N}` rule before the GPT-2 regex)."""
    if _byte_level(pre):
        return TOKENIZER_PRE
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" \
        else None
    if (isinstance(steps, list) and len(steps) == 2 and isinstance(steps[0], dict)
            and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and _byte_level(steps[1])):
        return "smollm"
    return None


def pre_tokenizer_by_hash(obj: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a parsed tokenizer.json as its converter finds it
    (`io.gguf_pre`: sha256 of the ids the tokenizer gives a fixed text, with its own special
    tokens added, as transformers' `encode` adds them), or None when the hash is not llama.cpp's."""
    import hashlib
    import json

    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(json.dumps(obj))
    except Exception:  # a malformed file: the structural checks of read_tokenizer name it
        return None
    ids = tok.encode(CHKTXT).ids
    return KNOWN.get(hashlib.sha256(str(ids).encode()).hexdigest())


def read_tokenizer(path: Path, vocab_size: int, pre: str | None = None) -> TokenizerSpec:
    """The byte-level BPE `path` (a tokenizer.json) as llama.cpp's `gpt2` tokenizer, with the
    chat template beside it. `pre`: llama.cpp's pre-tokenizer name when the caller knows it (a
    GGUF source's own `tokenizer.ggml.pre`); else found by hash (`pre_tokenizer_by_hash`), else
    from the structure (`pre_tokenizer_name`). Anything else (another model type, a tokenizer
    llama.cpp has no name for) is refused: llama.cpp would tokenize differently from the
    model's training."""
    obj = read_json(path, limit=1 << 30)  # regular files only: a FIFO is refused, not waited on
    if is_spm(obj):
        return _spm_spec(path, obj, vocab_size)
    model = obj.get("model") if isinstance(obj, dict) else None
    structure = obj.get("pre_tokenizer") if isinstance(obj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(
            model.get("vocab"), dict):
        raise CheckpointError(f"{path}: model is not a BPE vocabulary; only byte-level BPE "
                              f"and byte-fallback (SentencePiece-style) BPE tokenizers can be "
                              f"exported to llama.cpp")
    name = pre or pre_tokenizer_by_hash(obj)
    if name is None:
        name = pre_tokenizer_name(structure)
        if obj.get("normalizer") is not None or model.get("byte_fallback") or name is None:
            raise CheckpointError(
                f"{path}: pre_tokenizer {structure!r} (normalizer {obj.get('normalizer')!r}) is "
                f"not one llama.cpp knows by its hash, nor ByteLevel(add_prefix_space=False, "
                f"use_regex=True) without a normalizer (or SmolLM's Digits + that ByteLevel); "
                f"llama.cpp's '{TOKENIZER_PRE}' pre-tokenizer would split text differently")
    spec = _tokenizer_spec(path, obj, model, vocab_size)
    spec.pre = name
    return spec


def _spm_spec(path: Path, obj: dict, vocab_size: int) -> TokenizerSpec:
    """A byte-fallback BPE as llama.cpp's `llama` tokenizer (`io.gguf_spm`), the flags and chat
    template from tokenizer_config.json (add_bos/add_eos, when it does not say, from the
    post-processor)."""
    add_space_prefix = space_prefix(path, obj)
    tokens, scores, types, unk_id = spm_vocab(path, obj, vocab_size)
    bos, eos = adds_bos_eos(obj)
    tcfg = _tokenizer_config(path)
    return TokenizerSpec(tokens, types, [], bool(tcfg.get("add_bos_token", bos)),
                         bool(tcfg.get("add_eos_token", eos)), pre="default",
                         chat_template=_chat_template(path, tcfg), model="llama", scores=scores,
                         add_space_prefix=add_space_prefix, unk_id=unk_id)


def _tokenizer_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json beside `path` ({} when absent or unreadable)."""
    cfg_path = path.parent / "tokenizer_config.json"
    try:
        tcfg = read_json(cfg_path) if os.path.lexists(cfg_path) else {}
    except CheckpointError:
        tcfg = {}
    return tcfg if isinstance(tcfg, dict) else {}


def _tokenizer_spec(path: Path, obj: dict, model: dict, vocab_size: int) -> TokenizerSpec:
    gguf = _gguf()
    by_id: dict[int, str] = {}
    for tok, i in model["vocab"].items():
        by_id[int(i)] = tok
    special: set[int] = set()
    for added in obj.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        if added.get("special"):
            special.add(int(added["id"]))
    if by_id and max(by_id) >= vocab_size:
        raise CheckpointError(f"{path}: token id {max(by_id)} does not fit the model's "
                              f"vocab_size={vocab_size} (config.json)")
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces: padding rows of the embedding
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tcfg = _tokenizer_config(path)
    return TokenizerSpec(tokens, types, merges, bool(tcfg.get("add_bos_token", False)),
                         bool(tcfg.get("add_eos_token", False)),
                         chat_template=_chat_template(path, tcfg))


def _chat_template(path: Path, tcfg: dict[str, Any]) -> str | None:
    """tokenizer_config.json's `chat_template`, or chat_template.jinja beside `path`."""
    template = tcfg.get("chat_template")
    jinja = path.parent / "chat_template.jinja"  # transformers >= 4.50 saves it apart
    if is_regular(jinja):
        try:
            template = read_bytes(jinja, limit=1 << 24).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{jinja}: not UTF-8 text") from None
    if isinstance(template, list):  # named templates: the default one
        template = {t.get("name"): t.get("template") for t in template
                    if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


# ---- metadata and writing -----------------------------------------------------------------------


@dataclass
class ModelMeta:
    """The hyperparameters llama.cpp reads (per-layer lists may all be equal)."""

    name: str
    context_length: int
    hidden_size: int
    ffn_widths: list[int]
    heads: list[int]
    kv_heads: list[int]
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    family_arch: str = "llama"
    """llama.cpp's architecture for a uniform model of the family (`llama`, `qwen2`, `qwen3`,
    `gemma3`)."""
    rope: dict[str, Any] | None = None
    """transformers' `rope_parameters` of a scaled rope (None: default rope)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Family keys: {gguf.GGUFWriter `add_<name>` method suffix: value}, written after the
    common ones (e.g. gemma3's sliding_window, rope_freq_base_swa)."""

    @property
    def uniform(self) -> bool:
        return all(len(set(v)) == 1 for v in (self.ffn_widths, self.heads, self.kv_heads))

    @property
    def arch(self) -> str:
        if self.uniform:
            return self.family_arch
        if self.family_arch != "llama":
            raise ConfigError(
                f"llama.cpp's {self.family_arch} graph builds every layer with layer 0's FFN "
                f"width and heads, so a per-layer (Mix'n'Match) model does not load there; export "
                f"a uniform tier (--tier N, --kv-heads G), or keep the per-layer model as "
                f"safetensors (`matformer slice`) for matformer")
        return "deci"


def _scalar_or_list(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)


def add_metadata(w: Any, meta: ModelMeta, tok: TokenizerSpec, outtype: str) -> None:
    """Key/values as convert_hf_to_gguf.py writes them for LlamaForCausalLM (or DeciLM)."""
    gguf = _gguf()
    w.add_type("model")
    w.add_name(meta.name)
    w.add_block_count(len(meta.ffn_widths))
    w.add_context_length(meta.context_length)
    w.add_embedding_length(meta.hidden_size)
    w.add_feed_forward_length(_scalar_or_list(meta.ffn_widths))
    w.add_head_count(_scalar_or_list(meta.heads))
    w.add_head_count_kv(_scalar_or_list(meta.kv_heads))
    w.add_rope_freq_base(meta.rope_theta)
    _add_rope_scaling(w, meta.rope)
    w.add_layer_norm_rms_eps(meta.rms_norm_eps)
    w.add_key_length(meta.head_dim)
    w.add_value_length(meta.head_dim)
    w.add_file_type(file_type(outtype))
    w.add_vocab_size(meta.vocab_size)
    w.add_rope_dimension_count(meta.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model(tok.model)
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    if tok.scores is not None:
        w.add_token_scores(tok.scores)
    w.add_token_types(tok.token_types)
    if tok.model == "gpt2":  # convert writes no merges for a `llama` vocabulary
        w.add_token_merges(tok.merges)
    if tok.unk_id is not None:
        w.add_unk_token_id(tok.unk_id)
    if tok.add_space_prefix is not None:
        w.add_add_space_prefix(tok.add_space_prefix)
    for key, value in (("bos", meta.bos_token_id), ("eos", meta.eos_token_id),
                       ("pad", meta.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.chat_template is not None:
        w.add_chat_template(tok.chat_template)
    for key, value in meta.extra.items():
        getattr(w, f"add_{key}")(value)


def _add_rope_scaling(w: Any, rope: dict[str, Any] | None) -> None:
    """Rope scaling keys as convert_hf_to_gguf.py writes them (`linear`: type and factor;
    `yarn`: type, factor, original context, attention factor and betas when given; `llama3`:
    the `rope_freqs` tensor instead; `dynamic`: nothing, llama.cpp runs it as default rope,
    which it equals within max_position_embeddings), plus transformers' own parameters under
    `ROPE_PARAMETERS_KEY` for our reader."""
    if not rope or rope.get("rope_type", "default") == "default":
        return
    import json

    gguf = _gguf()
    kind = rope["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if rope.get("attention_factor") is not None:
            w.add_rope_scaling_yarn_attn_factor(float(rope["attention_factor"]))
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    w.add_string(ROPE_PARAMETERS_KEY, json.dumps(rope, sort_keys=True))


@dataclass
class TensorPlan:
    """One GGUF tensor: its name, logical shape (numpy order) and storage type."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType


def write_gguf(out: str | os.PathLike, meta: ModelMeta, tok: TokenizerSpec, outtype: str,
               tensors: Sequence[TensorPlan], produce: Callable[[TensorPlan], np.ndarray], *,
               protect: Protected = ()) -> int:
    """Write the GGUF file: metadata, tensor infos, then `produce(t)` (float32 values) for one
    tensor at a time. Written by the rule of `io.outputs` (never over a file of `protect`,
    through symlinks, a temporary file beside the target renamed over it when complete, a full
    disk is one line and leaves nothing). Returns the file size."""
    gguf = _gguf()
    with output_temp(out, protect=protect, what="GGUF file", error=CheckpointError) as tmp:
        w = gguf.GGUFWriter(tmp, meta.arch)
        try:
            add_metadata(w, meta, tok, outtype)
            for t in tensors:
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32),
                                  _byte_count(t.shape, t.qtype), raw_dtype=t.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t in tensors:
                data = encode(produce(t), t.qtype)
                w.write_tensor_data(data)
                del data
            assert w.fout is not None
            f = w.fout[0]
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        finally:
            with contextlib.suppress(OSError):
                w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    return size


def field_value(reader: Any, key: str) -> Any:
    """A metadata value of a `gguf.GGUFReader` of a written file: scalar, string, or list."""
    f = reader.fields[key]
    if not f.types:
        return None
    gguf = _gguf()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return list(f.contents())
    return f.contents()
