"""Export one width of a checkpoint to a GGUF file that llama.cpp runs (`matformer export`).

- plan: the request (`tier`, per-layer `layer_tiers`, or `widths`; none = the stored widths) is
  resolved to per-layer FFN widths, and `kv_heads`/`layer_kv_heads` (none = the stored heads) to
  per-layer KV heads, each of which the source must hold. Head counts are written per layer
  (`head_count`/`head_count_kv` arrays) when they differ between layers. Uniform models are written as llama.cpp's `llama` architecture, per-layer ones
  as `deci` (see `matformer.io.gguf` for why).
- stream: each GGUF tensor is read by `io.tensors.TensorReader` (only its prefix rows, or the
  first columns of each row for down_proj/o_proj), converted to float32, permuted for rope if it
  is q/k, encoded to the output type and written before the next one is read. Peak memory is
  about one tensor as stored plus in float32 plus its encoded copy, whatever the model's size.

Needs no torch: numpy, the `gguf` package, and our safetensors header reader.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matformer.errors import CheckpointError, ConfigError
from matformer.io.checkpoint import open_checked
from matformer.io.gguf import (
    NEOX_ARCHS,
    ROPE_FREQS,
    ModelMeta,
    TensorPlan,
    check_outtype,
    gguf_name,
    permute_rope,
    read_tokenizer,
    tensor_qtype,
    write_gguf,
)
from matformer.io.gguf_source import gguf_pre_name
from matformer.io.layout import Checkpoint
from matformer.io.outputs import check_output
from matformer.io.source import Source, resolve_source
from matformer.io.tensors import TO_F32, ReadJob, TensorReader
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.numerics import hidden_act
from matformer.models.lm.rope import llama3_factors
from matformer.models.registry import Config, family_of_config
from matformer.slicing import gemma3_export as g3
from matformer.tiers import Setting, WidthRequest, describe_heads, describe_widths


@dataclass
class TensorJob:
    """One GGUF tensor and where its values come from."""

    plan: TensorPlan
    read: ReadJob | None  # the source tensor's kept rows (gate/up, q/k/v) or columns (down, o)
    rope_heads: int | None = None  # permute rows for llama.cpp's rope with this many heads
    values: np.ndarray | None = None  # a tensor made here, not read (llama3's rope_freqs)
    shift: float = 0.0  # added to every value (Gemma's (1 + w) norms are stored as 1 + w)


@dataclass
class ExportPlan:
    config: Config
    widths: list[int]
    meta: ModelMeta
    jobs: list[TensorJob] = field(default_factory=list)


@dataclass
class ExportResult:
    path: Path
    arch: str
    widths: list[int]
    base: int
    outtype: str
    n_tensors: int
    bytes_written: int
    seconds: float
    kv_heads: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (f"wrote {self.path} ({self.bytes_written / 1e6:.1f} MB, {self.n_tensors} tensors, "
                f"{self.outtype}): llama.cpp architecture '{self.arch}', "
                f"{describe_widths(self.base, self.widths)}"
                + (f", {describe_heads(self.kv_heads)}" if self.kv_heads else "")
                + f", in {self.seconds:.1f}s")


# ---- planning -------------------------------------------------------------------------------


def resolve_request(config: Config, request: WidthRequest) -> Setting:
    """Per-layer FFN widths and KV heads for `request` (an axis not named: as stored), each
    held by the source."""
    return request.resolve(config, holder="the source",
                           remedy="export from a checkpoint that holds it",
                           heads_remedy="export from a checkpoint that holds them")


def request_widths(config: Config, *, tier: int | None = None,
                   layer_tiers: Sequence[int] | None = None,
                   widths: int | Sequence[int] | None = None) -> list[int]:
    """Per-layer FFN widths for a request (none: the stored widths), each held by the source."""
    request = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths)
    return resolve_request(config, request).widths


def plan_export(config: Config, shapes: dict[str, tuple[int, ...]], widths: list[int],
                outtype: str, name: str, kv_heads: list[int] | None = None) -> ExportPlan:
    """GGUF tensors and metadata for `config` cut to `widths` and per-layer `kv_heads` (default:
    the stored heads; shapes: the stored tensors). A Gemma 3 config is planned by
    `slicing.gemma3_export` (llama.cpp's `gemma3` architecture)."""
    if family_of_config(config).name == "gemma3":
        return _plan_gemma3(config, shapes, widths, outtype, name, kv_heads)
    n, hd = config.num_hidden_layers, config.head_dim
    assert hd is not None
    act = hidden_act(config)
    if act not in ("silu", "swish"):  # llama.cpp's llama architecture computes SwiGLU only
        raise ConfigError(f"hidden_act={act!r}: llama.cpp's llama architecture runs silu only; "
                          f"this checkpoint cannot be exported to GGUF with the same logits")
    kv_heads = config.layer_kv_heads if kv_heads is None else list(kv_heads)
    heads = [g * config.group_size for g in kv_heads]
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    # llama.cpp's llama/qwen graphs have no sliding window: the window (if shorter) becomes the
    # context length, so llama.cpp never runs a sequence where the window would mask.
    context = min([config.max_position_embeddings,
                   *(w for w in config.layer_windows if w is not None)])
    meta = ModelMeta(name=name, context_length=context,
                     hidden_size=config.hidden_size, ffn_widths=list(widths), heads=heads,
                     kv_heads=kv_heads, head_dim=hd, rope_theta=config.rope_theta,
                     rms_norm_eps=config.rms_norm_eps, vocab_size=config.vocab_size,
                     bos_token_id=config.bos_token_id, eos_token_id=eos,
                     pad_token_id=config.pad_token_id, family_arch=config.GGUF_ARCH,
                     rope=config.rope.to_dict() if config.rope.scaled else None)
    arch = meta.arch  # a per-layer model of a family llama.cpp reads uniform only: refused
    if arch == "qwen2" and heads[0] * hd != config.hidden_size:
        raise ConfigError(f"llama.cpp's qwen2 graph needs query heads x head_dim = hidden_size "
                          f"({heads[0]} x {hd} != {config.hidden_size}): export all "
                          f"{config.base_kv_heads} KV heads (the FFN tiers export), or slice the "
                          f"head cut to safetensors (`matformer slice`), which transformers loads")
    if arch == "qwen3" and config.o_bias:
        raise ConfigError("llama.cpp's qwen3 graph loads no o_proj bias (attention_bias: true), "
                          "so the file would not load there; keep this model as safetensors "
                          "(`matformer slice`), which transformers loads")
    if arch == "deci" and (config.qkv_bias or config.o_bias or config.rope.scaled):
        raise ConfigError("llama.cpp's deci graph (per-layer widths) reads no attention biases "
                          "or rope scaling: export a uniform tier (--tier N)")
    plan = ExportPlan(config, list(widths), meta)
    order = ["model.embed_tokens.weight"]
    if config.rope.rope_type == "llama3":
        order.append(ROPE_FREQS)
    for i in range(n):
        order += [f"model.layers.{i}.{t}" for t in expected_layer_order(config)]
    order.append("model.norm.weight")
    if not config.tie_word_embeddings:  # tied: llama.cpp reuses token_embd as the output
        order.append("lm_head.weight")
    for src in order:
        if src == ROPE_FREQS:  # what llama.cpp's converter writes for Llama 3 rope scaling
            values = np.asarray(llama3_factors(config.rope, hd), dtype=np.float32)
            plan.jobs.append(TensorJob(TensorPlan(ROPE_FREQS, values.shape, tensor_qtype(
                outtype, values.shape)), None, values=values))
            continue
        plan.jobs.append(_job(src, shapes[src], plan, outtype))
    return plan


def expected_layer_order(config: MatFormerConfig) -> list[str]:
    """A layer's tensors (names after `model.layers.N.`) in llama.cpp converter order."""
    attn = ["self_attn.q_proj.weight"]
    if config.qkv_bias:
        attn += ["self_attn.q_proj.bias"]
    attn += ["self_attn.k_proj.weight"] + (["self_attn.k_proj.bias"] if config.qkv_bias else [])
    attn += ["self_attn.v_proj.weight"] + (["self_attn.v_proj.bias"] if config.qkv_bias else [])
    attn += ["self_attn.o_proj.weight"] + (["self_attn.o_proj.bias"] if config.o_bias else [])
    if config.qk_norm:
        attn += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    return ["input_layernorm.weight", *attn, "post_attention_layernorm.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def _plan_gemma3(config: Config, shapes: dict[str, tuple[int, ...]], widths: list[int],
                 outtype: str, name: str, kv_heads: list[int] | None) -> ExportPlan:
    """llama.cpp's `gemma3` (`slicing.gemma3_export`): norms whole and shifted to 1 + w, q/k
    rows as transformers has them (llama.cpp ropes Gemma in the NEOX layout)."""
    plan = ExportPlan(config, list(widths), g3.gemma3_meta(config, widths, kv_heads, name))
    for src in g3.tensor_order(config):
        shape = shapes[src]
        if g3.is_norm(src):
            out = gguf_name(src, config.num_hidden_layers, g3.ARCH)
            plan.jobs.append(TensorJob(TensorPlan(out, tuple(shape), tensor_qtype(outtype, shape)),
                                       ReadJob(src, to="F32"), shift=g3.NORM_SHIFT))
        else:
            job = _job(src, shape, plan, outtype)
            job.rope_heads = None
            plan.jobs.append(job)
    return plan


def _job(src: str, shape: tuple[int, ...], plan: ExportPlan, outtype: str) -> TensorJob:
    rows = cols = heads = None
    if src.startswith("model.layers."):
        i = int(src.split(".")[2])
        w = plan.widths[i]
        if src.endswith(("gate_proj.weight", "up_proj.weight")):
            rows, shape = w, (w, *shape[1:])
        elif src.endswith("down_proj.weight"):
            cols, shape = w, (shape[0], w)
        elif ".self_attn." in src and "_norm." not in src and not src.endswith("o_proj.bias"):
            # heads nest by KV group: prefixes of rows / columns (biases: of their rows)
            hd = plan.config.head_dim
            assert hd is not None
            q, kv = plan.meta.heads[i] * hd, plan.meta.kv_heads[i] * hd
            if ".q_proj." in src:
                heads, rows, shape = plan.meta.heads[i], q, (q, *shape[1:])
            elif ".k_proj." in src:
                heads, rows, shape = plan.meta.kv_heads[i], kv, (kv, *shape[1:])
            elif ".v_proj." in src:
                rows, shape = kv, (kv, *shape[1:])
            else:  # o_proj
                cols, shape = q, (shape[0], q)
    arch = plan.meta.arch
    if arch in NEOX_ARCHS:
        heads = None  # llama.cpp rotates halves there, as transformers does: rows stay
    name = gguf_name(src, plan.config.num_hidden_layers, arch)
    read = ReadJob(src, rows=None if rows is None else ((0, rows),),
                   cols=None if cols is None else ((0, cols),), to="F32")
    return TensorJob(TensorPlan(name, tuple(shape), tensor_qtype(outtype, shape, name)), read,
                     heads)


# ---- reading ----------------------------------------------------------------------------------


def produce(reader: TensorReader, job: TensorJob) -> np.ndarray:
    """The float32 values of one GGUF tensor, in llama.cpp's row order."""
    if job.values is not None:
        return job.values
    assert job.read is not None
    ck, src = reader.ck, job.read.src
    if ck.info(src).dtype not in TO_F32:
        raise CheckpointError(f"{ck.layout.folder / ck.where[src]}: tensor {src!r} is "
                              f"{ck.info(src).dtype}; GGUF export reads F32, F16 or BF16 weights")
    data = reader.read_array(job.read)
    if job.rope_heads is not None:
        data = permute_rope(data, job.rope_heads)
    if job.shift:
        data = data + np.float32(job.shift)
    return data


# ---- the command -------------------------------------------------------------------------------


def open_source(src: str | os.PathLike | Source, request: WidthRequest,
                revision: str | None = None) -> tuple[Source, Checkpoint]:
    """SRC resolved (a folder, a .safetensors file, a Hub id, a multi-tier repo: the tier folder
    that holds the request's widest layer) and its headers validated against its config."""
    source = resolve_source(src, request=request, revision=revision, companions=True)
    return source, open_checked(source, "export")


def export_gguf(src: str | os.PathLike | Source, out: str | os.PathLike, *, tier: int | None = None,
                layer_tiers: Sequence[int] | None = None,
                widths: int | Sequence[int] | None = None, outtype: str = "f16",
                revision: str | None = None, kv_heads: int | None = None,
                layer_kv_heads: Sequence[int] | None = None) -> ExportResult:
    """Write the GGUF file `out` for one width (and head count) of `src` (see the module
    docstring). Bad requests
    raise our errors before anything is written; an existing `out` is replaced only by a
    complete file."""
    t0 = time.perf_counter()
    request = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths, kv_heads=kv_heads,
                           layer_kv_heads=layer_kv_heads)
    check_outtype(outtype)
    source, ck = open_source(src, request, revision=revision)
    folder, config = source.folder, source.config
    out_path = Path(out)
    tok_path = source.require_tokenizer()
    protect = [*source.read_files(), tok_path]
    check_output(out_path, protect=protect, what="GGUF file", error=CheckpointError)
    ws, hl = resolve_request(config, request)
    tok = read_tokenizer(tok_path, config.vocab_size, pre=gguf_pre_name(source.folder))
    shapes = {n: tuple(t.shape) for n, t in ck.tensors.items()}
    plan = plan_export(config, shapes, ws, outtype, folder.resolve().name, hl)
    by_name = {j.plan.name: j for j in plan.jobs}
    # Whole-row chunks with readahead: the disk pattern of the memory map this replaced.
    with TensorReader(ck, exact_run_limit=0, readahead=True) as reader:
        size = write_gguf(out_path, plan.meta, tok, outtype, [j.plan for j in plan.jobs],
                          lambda t: produce(reader, by_name[t.name]), protect=protect)
    return ExportResult(out_path, plan.meta.arch, ws, config.base, outtype, len(plan.jobs), size,
                        time.perf_counter() - t0, kv_heads=hl)
