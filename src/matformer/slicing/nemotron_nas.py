"""Nemotron-NAS export: one width of a checkpoint as a `DeciLMForCausalLM` / `model_type:
"nemotron-nas"` checkpoint, the per-layer Llama format the serving engines load (vLLM, SGLang,
TensorRT-LLM, mlx-lm, and llama.cpp through its converter's `DeciModel`).

Why this format: a Mix'n'Match width (one FFN width per layer) or per-layer KV heads is no plain
Llama; the engines read per-layer sizes only from NVIDIA's `block_configs`, one entry per layer:
- `ffn.ffn_mult`: the engines compute the FFN width as `_ffn_mult_to_intermediate_size`:
  int(2 * ffn_mult * hidden_size / 3), rounded *up* to a multiple of 256 (vLLM
  `model_executor/models/nemotron_nas.py`, llama.cpp `conversion/deci.py`; NVIDIA's own config
  code also rounds ffn_mult to 6 decimals first). So only multiples of 256 are expressible; any
  other width is refused with the nearest expressible ones named, never written rounded.
- `attention.n_heads_in_group`: query heads per KV head; the engines build every attention layer
  with the model's one `num_attention_heads` (N) and N / n_heads_in_group KV heads, and llama.cpp
  takes the head size as hidden_size / N. Our nested heads cut the query heads with their KV
  group (g KV heads keep g*r query heads). A layer with g < G KV heads is written with its g KV
  heads (the KV cache shrinks as asked) and N/g query-head slots per group: the first r of each
  group are the layer's own query heads, the rest are zero rows of q_proj and zero columns of
  o_proj, which add exactly 0 to the output. The logits are the same; q/o are not smaller.
  A g that does not divide N is refused with the nearest counts that do.
- `attention.no_op` / `ffn.no_op`: a skipped layer (`skip_layers`) stays in place as a no-op
  block (both sub-blocks no-op, `ffn_mult` null, no tensors): the residual passes through, which
  is what dropping the layer computes.

The remote-code config the engines need (`trust_remote_code`: the format is not in transformers)
is written beside the weights as our own `configuration_decilm.py` (`NAS_CONFIG_CODE`): a
LlamaConfig whose `block_configs` entries read as attributes (`block.attention.no_op`), as vLLM
reads them. Tensors stream one at a time (`io.tensors.TensorReader`), as `extract` does.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matformer.errors import ConfigError, TierError
from matformer.io.checkpoint import open_checked, write_folder
from matformer.io.outputs import check_output_folder
from matformer.io.source import COMPANION_FILES, Source, resolve_source
from matformer.io.tensors import ReadJob, TensorReader
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.numerics import hidden_act
from matformer.models.registry import LM, family_of_config
from matformer.slicing.extract import plan_slice
from matformer.tiers import WidthRequest

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"
FFN_MULTIPLE = 256
"""The engines round every FFN width up to a multiple of this (`_find_multiple(n, 256)`)."""
MULT_DECIMALS = 6
"""NVIDIA's FFNConfig rounds ffn_mult to this many decimals when it reads block_configs."""
CONFIG_MODULE = "configuration_decilm.py"


# ---- the engines' arithmetic ---------------------------------------------------------------------


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width an engine builds for `ffn_mult` (vLLM's and llama.cpp's
    `_ffn_mult_to_intermediate_size`: int(2 * m * hidden / 3) rounded up to a multiple of 256)."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % FFN_MULTIPLE == 0 else n + FFN_MULTIPLE - n % FFN_MULTIPLE


def ffn_mult_for(width: int, hidden_size: int) -> float:
    """The ffn_mult that every engine turns back into exactly `width` (also after NVIDIA's
    rounding to 6 decimals); a TierError when `width` is not a positive multiple of 256."""
    if width <= 0 or width % FFN_MULTIPLE:
        raise TierError(f"FFN width {width} is not a multiple of {FFN_MULTIPLE}")
    # Aim at the middle of the interval (width - 256, width] that rounds up to `width`, so float
    # error on either side cannot move it to a neighbour.
    for target in (width, width - FFN_MULTIPLE // 2):
        mult = round(3 * target / (2 * hidden_size), MULT_DECIMALS)
        if (ffn_mult_to_intermediate_size(mult, hidden_size) == width
                and ffn_mult_to_intermediate_size(round(mult, MULT_DECIMALS), hidden_size) == width):
            return float(mult)
    raise TierError(f"FFN width {width} has no ffn_mult of {MULT_DECIMALS} decimals for "
                    f"hidden_size {hidden_size}")  # pragma: no cover (the middle always works)


def nearest_widths(width: int, held: int) -> list[int]:
    """The expressible widths (multiples of 256) next to `width`, at most `held` (what the
    source layer stores)."""
    below = width // FFN_MULTIPLE * FFN_MULTIPLE
    return [w for w in (below, below + FFN_MULTIPLE) if 0 < w <= held and w != width]


def nearest_kv_heads(g: int, n_heads: int, held: int) -> list[int]:
    """The KV head counts next to `g` that divide `n_heads` and the layer holds."""
    ok = [d for d in range(1, held + 1) if n_heads % d == 0]
    lower = [d for d in ok if d < g][-1:]
    upper = [d for d in ok if d > g][:1]
    return lower + upper


# ---- planning -----------------------------------------------------------------------------------


@dataclass
class NasLayer:
    """One output block: its FFN width and KV heads, or None for a no-op sub-block."""

    width: int | None
    kv_heads: int | None

    def block_config(self, n_heads: int, hidden_size: int) -> dict[str, Any]:
        """This layer's `block_configs` entry, in the keys NVIDIA's checkpoints carry."""
        attn_op = self.kv_heads is None
        ffn_op = self.width is None
        return {
            "attention": {"n_heads_in_group": None if attn_op else n_heads // self.kv_heads,
                          "no_op": attn_op, "replace_with_linear": False, "sparsify": None,
                          "window_length": None, "num_sink_tokens": None,
                          "use_prefill_window_in_sink_attention": False, "unshifted_sink": False},
            "ffn": {"ffn_mult": None if ffn_op else ffn_mult_for(self.width, hidden_size),
                    "no_op": ffn_op, "replace_with_linear": False, "sparsify": None},
        }


@dataclass
class NasPlan:
    """What to write: the source config, one `NasLayer` per source layer, the model's query
    heads N, and the Mix'n'Match explanation of the width choice."""

    source: MatFormerConfig
    layers: list[NasLayer]
    n_heads: int
    explanation: str

    @property
    def head_dim(self) -> int:
        assert self.source.head_dim is not None
        return self.source.head_dim

    def config_dict(self, torch_dtype: str) -> dict[str, Any]:
        """config.json of the export (the keys the engines read, plus matformer's metadata)."""
        c = self.source
        kv = [layer.kv_heads for layer in self.layers if layer.kv_heads is not None]
        eos = c.eos_token_id
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "auto_map": {"AutoConfig": f"{CONFIG_MODULE[:-3]}.DeciLMConfig"},
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": len(self.layers),
            "num_attention_heads": self.n_heads,
            # some tools read one KV count; the per-layer counts are in block_configs
            "num_key_value_heads": kv[0] if kv else self.n_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": c.tie_word_embeddings,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": c.pad_token_id,
            "torch_dtype": torch_dtype,
            "block_configs": [layer.block_config(self.n_heads, c.hidden_size)
                              for layer in self.layers],
            "matformer_base_intermediate_size": c.base,
            "matformer_base_num_key_value_heads": c.base_kv_heads,
        }

    def describe(self) -> str:
        parts = []
        for i, layer in enumerate(self.layers):
            if layer.width is None and layer.kv_heads is None:
                parts.append(f"{i}: no-op")
            else:
                parts.append(f"{i}: ffn {layer.width}, {layer.kv_heads} KV heads")
        return "block_configs: " + "; ".join(parts)


def plan_nemotron_nas(source: MatFormerConfig, *, tier: int | None = None,
                      widths: int | Sequence[int] | None = None,
                      layer_tiers: Sequence[int] | None = None,
                      budget: int | str | None = None,
                      skip_layers: Sequence[int] | None = None,
                      kv_heads: int | None = None,
                      layer_kv_heads: Sequence[int] | None = None) -> NasPlan:
    """Validate a request (as `extract.plan_slice` takes it) against the source and the format:
    every kept layer's width must be a multiple of 256 and its KV heads must divide the model's
    query heads; skipped layers become no-op blocks in place. One-line errors otherwise."""
    if family_of_config(source) is not LM or not isinstance(source, MatFormerConfig):
        raise ConfigError(f"--format {MODEL_TYPE} writes Llama-family language models; this "
                          f"checkpoint is a {family_of_config(source).name!r} model")
    act = hidden_act(source)
    if act not in ("silu", "swish"):  # llama.cpp's deci graph computes SwiGLU only
        raise ConfigError(f"hidden_act={act!r}: the {MODEL_TYPE} engines (llama.cpp's deci) run "
                          f"silu only; this checkpoint cannot be written with the same logits")
    if source.rope.scaled or source.qkv_bias or source.o_bias:
        what = (f"rope_type {source.rope.rope_type!r}" if source.rope.scaled
                else "attention biases")
        raise ConfigError(f"{what}: this {MODEL_TYPE} writer states default rope and no "
                          f"biases, so the export would compute other logits; slice to "
                          f"safetensors (the default format) or export GGUF instead")
    hd = source.head_dim
    assert hd is not None
    if source.hidden_size % hd:
        raise ConfigError(f"head_dim {hd} does not divide hidden_size {source.hidden_size}: "
                          f"llama.cpp's converter takes the head size as hidden_size / "
                          f"num_attention_heads, so {MODEL_TYPE} cannot describe this model")
    n_heads = source.hidden_size // hd
    r = source.group_size
    if n_heads < source.base_kv_heads * r:
        raise ConfigError(f"hidden_size / head_dim = {n_heads} query heads is fewer than the "
                          f"{source.base_kv_heads * r} the model has: {MODEL_TYPE} cannot "
                          f"describe it (llama.cpp derives the head size from hidden_size)")
    plan = plan_slice(source, tier=tier, widths=widths, layer_tiers=layer_tiers, budget=budget,
                      skip_layers=skip_layers, kv_heads=kv_heads, layer_kv_heads=layer_kv_heads)
    by_layer = dict(zip(plan.keep_layers, zip(plan.widths, plan.kv_heads, strict=True),
                        strict=True))
    layers: list[NasLayer] = []
    for i in range(source.num_hidden_layers):
        if i not in by_layer:
            layers.append(NasLayer(None, None))
            continue
        w, g = by_layer[i]
        if w % FFN_MULTIPLE:
            near = nearest_widths(w, source.layer_widths[i])
            raise TierError(
                f"layer {i}: FFN width {w} cannot be written as {MODEL_TYPE}: the engines turn "
                f"ffn_mult into a multiple of {FFN_MULTIPLE} (vLLM, llama.cpp's converter); "
                f"nearest expressible: {' or '.join(map(str, near)) or 'none the layer holds'}")
        if n_heads % g or n_heads // g < r:
            near = nearest_kv_heads(g, n_heads, source.layer_kv_heads[i])
            raise TierError(
                f"layer {i}: {g} KV heads cannot be written as {MODEL_TYPE}: n_heads_in_group = "
                f"num_attention_heads {n_heads} / KV heads must be whole; nearest expressible: "
                f"{' or '.join(map(str, near)) or 'none the layer holds'}")
        layers.append(NasLayer(w, g))
    return NasPlan(source, layers, n_heads, plan.explanation)


# ---- tensors ----------------------------------------------------------------------------------

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass
class NasTensor:
    """One output tensor: its source, the block read, and the query-head padding (0: none)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    read: ReadJob
    pad: str | None = None  # "rows" (q_proj) or "cols" (o_proj): spread groups of r heads
    kv_heads: int = 0


def plan_tensors(plan: NasPlan, src_tensors: Sequence[tuple[str, str, Sequence[int]]]
                 ) -> list[NasTensor]:
    """The output tensors in the source's file order: no-op blocks have none; FFN tensors are
    cut to the layer's width, k/v to its KV heads, q/o to N query heads (padded when the layer
    keeps fewer than N)."""
    src = plan.source
    hd, n = plan.head_dim, plan.n_heads
    out: list[NasTensor] = []
    for name, dtype, shape in src_tensors:
        shape = tuple(int(d) for d in shape)
        at = LM.layer_of(name)
        if at is None:
            out.append(NasTensor(name, dtype, shape, ReadJob(name)))
            continue
        i, rest = at
        layer = plan.layers[i]
        if layer.width is None:  # a no-op block (both sub-blocks) has no tensors
            continue
        assert layer.kv_heads is not None
        g, r = layer.kv_heads, src.group_size
        part = rest.split(".")[1] if "." in rest else ""
        want, pad = shape, None
        if part in _FFN:
            w = layer.width
            want = (w, shape[1]) if part != "down_proj" else (shape[0], w)
        elif part in ("k_proj", "v_proj"):
            want = (g * hd, shape[1])
        elif part == "q_proj":
            want, pad = (g * r * hd, shape[1]), ("rows" if g * r < n else None)
        elif part == "o_proj":
            want, pad = (shape[0], g * r * hd), ("cols" if g * r < n else None)
        read = ReadJob.prefix(name, shape, want)
        final = want
        if pad == "rows":
            final = (n * hd, shape[1])
        elif pad == "cols":
            final = (shape[0], n * hd)
        out.append(NasTensor(name, dtype, final, read, pad, g))
    return out


def produce(reader: TensorReader, t: NasTensor, plan: NasPlan) -> Any:
    """The tensor `t` as written: the source block, and for a padded q/o the layer's g groups
    of r query heads each placed at the start of a group of N/g slots, zeros elsewhere."""
    import torch

    data = reader.read(t.read)
    if t.pad is None:
        return data
    hd, r, g = plan.head_dim, plan.source.group_size, t.kv_heads
    slots = plan.n_heads // g  # query heads per KV head in the written model
    out = torch.zeros(t.shape, dtype=data.dtype)
    for k in range(g):
        src = slice(k * r * hd, (k + 1) * r * hd)
        dst = slice(k * slots * hd, k * slots * hd + r * hd)
        if t.pad == "rows":
            out[dst] = data[src]
        else:
            out[:, dst] = data[:, src]
    return out


# ---- the command ------------------------------------------------------------------------------


@dataclass
class NasResult:
    """What `write_nemotron_nas` wrote."""

    path: Path
    plan: NasPlan
    files: list[str]
    bytes_written: int
    seconds: float

    def summary(self) -> str:
        return (f"{self.path}: {ARCHITECTURE} ({MODEL_TYPE}), {len(self.plan.layers)} blocks, "
                f"{self.plan.describe()}; {len(self.files)} files, "
                f"{self.bytes_written / 1e6:.1f} MB in {self.seconds:.2f} s")


NAS_CONFIG_CODE = '''\
"""The config class of a Nemotron-NAS (DeciLM) checkpoint written by matformer.

Engines load this format with trust_remote_code (it is not part of transformers): this module
makes each `block_configs` entry readable as attributes (`block.attention.n_heads_in_group`,
`block.ffn.ffn_mult`, `.no_op`, `.replace_with_linear`), as vLLM and SGLang read them, and writes
them back as plain JSON. Written by matformer (Apache-2.0); no NVIDIA code.
"""

from types import SimpleNamespace

from transformers import LlamaConfig


def _view(d):
    return SimpleNamespace(**{k: _view(v) if isinstance(v, dict) else v for k, v in d.items()})


def _plain(v):
    if isinstance(v, SimpleNamespace):
        return {k: _plain(x) for k, x in vars(v).items()}
    return v


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [b if isinstance(b, SimpleNamespace) else _view(b)
                              for b in (block_configs or [])]

    def to_dict(self):
        d = super().to_dict()
        d["block_configs"] = [_plain(b) for b in self.block_configs]
        return d
'''


def write_nemotron_nas(src: str | os.PathLike | Source, out: str | os.PathLike, *,
                       tier: int | None = None, widths: int | Sequence[int] | None = None,
                       layer_tiers: Sequence[int] | None = None, budget: int | str | None = None,
                       skip_layers: Sequence[int] | None = None, kv_heads: int | None = None,
                       layer_kv_heads: Sequence[int] | None = None,
                       max_shard_size: int | str = "5GB", revision: str | None = None,
                       log: Any = None) -> NasResult:
    """Write the Nemotron-NAS checkpoint `out` for one width of `src` (see the module docstring);
    every refusal comes before anything is written, and an existing `out` is replaced only by a
    complete folder."""
    say = log or (lambda *_: None)
    t0 = time.perf_counter()
    request = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths, kv_heads=kv_heads,
                           layer_kv_heads=layer_kv_heads)
    source = src if isinstance(src, Source) else resolve_source(
        src, request=request, revision=revision, companions=True)
    ck = open_checked(source, "export")
    out_path = Path(out)
    check_output_folder(out_path, protect=source.inputs(), what=f"{MODEL_TYPE} export")
    plan = plan_nemotron_nas(source.config, tier=tier, widths=widths, layer_tiers=layer_tiers,
                             budget=budget, skip_layers=skip_layers, kv_heads=kv_heads,
                             layer_kv_heads=layer_kv_heads)
    if budget is not None:
        say(plan.explanation)
    order = {s: k for k, s in enumerate(ck.layout.shards)}
    infos = sorted(ck.tensors.values(), key=lambda t: (order[ck.where[t.name]], t.start))
    tensors = plan_tensors(plan, [(t.name, t.dtype, t.shape) for t in infos])
    by_name = {t.name: t for t in tensors}
    dtypes = {t.dtype for t in tensors}
    torch_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(
        next(iter(dtypes)) if len(dtypes) == 1 else "", source.config.torch_dtype)
    config_json = json.dumps(plan.config_dict(torch_dtype), indent=2) + "\n"
    extra: dict[str, Any] = {name: source.folder / name for name in COMPANION_FILES
                             if name != "train_config.json" and (source.folder / name).is_file()}
    extra[CONFIG_MODULE] = NAS_CONFIG_CODE.encode()
    with TensorReader(ck) as reader:
        write_folder(out_path, config_json, [(t.name, t.dtype, t.shape) for t in tensors],
                     lambda name: produce(reader, by_name[name], plan),
                     max_shard_size=max_shard_size, extra_files=extra)
    files = sorted(p.name for p in out_path.iterdir() if p.is_file())
    size = sum((out_path / f).stat().st_size for f in files)
    return NasResult(out_path, plan, files, size, time.perf_counter() - t0)
