"""One decoding step as one C++ call, for batch-1 decoding on a CPU with one thread.

`torch.ops.matformer.decode_step` (`decode_step.cpp`, built with the other CPU kernels by
`row_kernel`) runs a whole step of a Llama-type `MatFormerLM` for one token: the same one-row
products and attention as the compiled step, and everything between them (norms, rotary
embedding, the KV cache write, the gated activation, residual adds) as loops over vectors that
stay in the CPU's cache. What it saves is what the compiled step spends outside its products:
the graph's Python wrapper, dynamo's guard check, an operator call per product and a kernel per
small fused operation, 0.7-0.9 ms of a 4.3-5 ms step of the 41.7M float16 benchmark model, and
most of a narrow tier's step. It needs no compilation: a `StaticDecoder` built with
`compile=True` uses it for one-token steps of one sequence wherever `plan` covers the model, and
its compiled graphs for everything else (verifies of several tokens, batches, prefill is eager).

What it covers (`plan` says why not, otherwise): `MatFormerLM` itself (Llama, Mistral, Qwen2 with
q/k/v biases, Qwen3 with q/k norms, sliding windows, every rope type but `dynamic` beyond the
trained length), at any FFN widths and KV heads, float32, float16 or bfloat16 weights, with the
projections plain `nn.Linear` (not wrapped by an adapter). Numerics follow the eager forward's
rounding to the model's dtype; sums run in float32. Set `MATFORMER_DECODE_STEP=0` to keep the
compiled step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from matformer.inference import row_kernel
from matformer.inference.huge_pages import contiguous_copies
from matformer.models.lm.model import (
    Attention,
    DecoderLayer,
    KVCache,
    MatFormerLM,
    NestedMLP,
    RMSNorm,
)
from matformer.models.lm.numerics import hidden_act

ENV = "MATFORMER_DECODE_STEP"
"""Set to 0 to run one-token steps through the compiled graph instead."""

WO, DOWN = 9, 14
"""Slots of the output and down projections among a layer's tensors (`decode_step.cpp`'s
`Slot`)."""

ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "relu": 3}
"""The FFN activations the C++ step computes (its `Act` numbers)."""

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

MAX_ROWS = 8
"""The most tokens of one call: a step, or a verify of up to 7 drafted tokens."""


def wanted() -> bool:
    """Whether one-token steps may run as `decode_step` (not `MATFORMER_DECODE_STEP=0`) and the
    CPU kernels are on (`row_kernel.ENABLED`: one torch thread, built here)."""
    return os.environ.get(ENV) != "0" and row_kernel.ENABLED


@dataclass
class DecodePlan:
    """The tensors of one model at one width setting over one cache, in the order
    `decode_step.cpp` reads them; call with (tokens, first column, padding) for the logits
    (1, T, V) of T <= `MAX_ROWS` tokens written to columns col..col+T-1."""

    layers: list[torch.Tensor]
    globals: list[torch.Tensor]
    layer_ints: list[int]
    ints: list[int]
    eps: float
    copied: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    """The weights whose slices the plan holds as copies, with their version then."""

    def fresh(self) -> bool:
        """Whether no weight it copied from was changed in place since (else make it again)."""
        return all(w._version == v for w, v in self.copied)

    def __call__(self, tokens: list[int], col: int, pad: int) -> torch.Tensor:
        return torch.ops.matformer.decode_step(self.layers, self.globals, self.layer_ints,
                                               self.ints, self.eps, tokens, col, pad)


def greedy_round(target: DecodePlan, draft: DecodePlan, token: int, k: int, col: int,
                 pad: int) -> tuple[list[int], list[int]]:
    """A greedy speculative round as one call (`decode_step.cpp`'s `decode_round`): `k` steps
    at `draft`'s setting from `token` in column `col`, each taking its argmax, then the verify of
    the k + 1 tokens at `target`'s (both plans of one model over one cache). Returns (the k
    drafts, the target's argmax after each of the k + 1 tokens); the target's entries are in
    columns col..col+k."""
    out = torch.ops.matformer.decode_round(target.layers, draft.layers, target.globals,
                                           target.layer_ints, draft.layer_ints, target.ints,
                                           target.eps, token, k, col, pad).tolist()
    return out[:k], out[k:]


def why_not(model: nn.Module, cache: KVCache) -> str | None:
    """Why `decode_step` cannot run this model over this cache, or None when it can."""
    if type(model) is not MatFormerLM:
        return f"{type(model).__name__} is not the Llama-type MatFormerLM"
    cfg = model.config
    embed = model.model.embed_tokens.weight
    if embed.device.type != "cpu" or embed.dtype not in DTYPES:
        return f"weights in {embed.dtype} on {embed.device}"
    if cache.k[0].shape[0] != 1:
        return "a batch of several sequences"
    if hidden_act(cfg) not in ACTIVATIONS:
        return f"activation {hidden_act(cfg)}"
    if cfg.rope.rope_type == "dynamic" and cache.max_len > cfg.max_position_embeddings:
        return "dynamic rope scaling beyond the trained length"
    for layer in model.model.layers:
        if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention \
                or type(layer.mlp) is not NestedMLP:
            return f"layer {type(layer).__name__} is not the model's own"
        a, f = layer.self_attn, layer.mlp
        linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj)
        if any(type(m) is not nn.Linear for m in linears):
            return "a projection is wrapped (an adapter)"
        norms = (layer.input_layernorm, layer.post_attention_layernorm,
                 *((a.q_norm, a.k_norm) if a.qk_norm else ()))
        if any(type(n) is not RMSNorm for n in norms):
            return "a norm is not the model's RMSNorm"
        if any(m.weight.dtype != embed.dtype or m.weight.stride(-1) != 1 for m in linears):
            return "projections of mixed dtypes or layouts"
    return None


def plan(model: MatFormerLM, cache: KVCache) -> DecodePlan:
    """The model's tensors at its active widths and KV heads over `cache` (batch 1), as views of
    its weights (norms, biases and the rotary tables as small float32 copies); check `why_not`
    first."""
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    none = torch.empty(0)

    def f32(t: torch.Tensor | None) -> torch.Tensor:
        return none if t is None else t.detach().float().contiguous()

    layers: list[torch.Tensor] = []
    layer_ints: list[int] = []
    sliced: list[tuple[int, nn.Parameter]] = []  # (slot in `layers`, the weight it slices)
    for layer in model.model.layers:
        a, f = layer.self_attn, layer.mlp
        wq, wk, wv, wo = (w.detach() for w in a._weights())
        bq, bk, bv = a._biases()
        gate, up, down = (w.detach() for w in f._weights())
        m = f.width
        g = a.kv_heads
        ck, cv = a._cache_heads(cache, g)
        base = len(layers)
        layers += [f32(layer.input_layernorm.weight), wq, wk, wv, f32(bq), f32(bk), f32(bv),
                   f32(a.q_norm.weight) if a.qk_norm else none,
                   f32(a.k_norm.weight) if a.qk_norm else none,
                   wo, f32(a.o_proj.bias), f32(layer.post_attention_layernorm.weight),
                   gate, up, down, ck, cv]
        layer_ints += [a.window or 0, g]
        if g < a.stored_kv_heads:
            sliced.append((base + WO, a.o_proj.weight))
        if m < f.stored_width:
            sliced.append((base + DOWN, f.down_proj.weight))
    # A narrower setting's column slices (the first m of each down-projection row, the first
    # heads of each output-projection row) are short runs of long rows, which this project's
    # development CPU reads at half the rate of one sequential run (rows of 512 of 4096 floats:
    # 10.7-11.7 against 21.3-22.3 GB/s in a standalone test, prefetching ahead no help): the
    # plan holds them as contiguous copies, made once per setting (a tier-3 plan of the 41.7M
    # model copies 6 MB of its 171).
    copies = contiguous_copies([layers[i] for i, _ in sliced])
    for (i, _), c in zip(sliced, copies, strict=True):
        layers[i] = c
    positions = torch.arange(cache.max_len)[None]
    cos, sin = model.rotary(positions, dtype)
    globals_ = [model.model.embed_tokens.weight.detach(), f32(model.model.norm.weight),
                model.lm_head.weight.detach(), f32(cos[0]), f32(sin[0])]
    ints = [cfg.head_dim, cfg.group_size, ACTIVATIONS[hidden_act(cfg)]]
    return DecodePlan(layers, globals_, layer_ints, ints, float(cfg.rms_norm_eps),
                      [(w, w._version) for _, w in sliced])
