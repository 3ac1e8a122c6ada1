"""Static-cache decoding: prefill, one-token steps and k-token verifies, eager or compiled.

`StaticDecoder` owns a preallocated KV cache of (batch, max_len) and runs the model's
`forward_static` on it (gpt-fast style): every shape is fixed by (batch, tokens per call, width),
never by the position, so `torch.compile` makes one graph per width and token count and keeps
it. The width is a setting of the model that dynamo guards on (the FFN widths are plain ints on
the modules), so switching between a draft and a verifier width finds the graph compiled for
each the first time and reuses it afterwards: no recompiles after the first use of a width
(tests/inference/test_generate.py counts them). `dynamic=False` keeps a verify of k+1 tokens from turning
the token dimension symbolic after a second k is seen.

Dynamo also guards on the token tensor's strides and on whether it is an inference tensor, so
the same (width, heads, tokens) reached with a slice of a longer tensor, or with a prompt tensor
made outside `torch.inference_mode`, used to be another graph: the costs `measure_costs` timed
were of graphs the rounds never ran, and the rounds compiled theirs the first time a (draft, k)
came up, inside timed decoding (issue 13's H100 run). `StaticDecoder` therefore runs every
forward in inference mode on a contiguous inference copy of the tokens (`_canonical`), and
allocates its cache there too: one graph per (width, heads, tokens, batch, cache length).

- CPU: inductor's default mode (fused pointwise kernels in C++, matmuls in MKL/oneDNN, except
  that the products of a step of at most 8 rows are reductions fused into those kernels:
  `matvec`); the
  per-token Python work left is dynamo's guard check and one call. With one torch thread and
  the C++ kernels built (`row_kernel`), a forward of up to 8 tokens of one sequence of a
  Llama-type model is instead one C++ call (`decode_step`: nothing to compile, nothing between
  the products), the compiled graph serving the rest (batches, longer blocks, other models).
- CUDA: mode="reduce-overhead" (CUDA graphs); the cache tensors are marked static addresses so
  the in-place writes stay inside the graph, and outputs are cloned before the next replay
  overwrites them.

Prefill runs eagerly (its length varies per call). Prompts of different lengths share the cache
left-padded: row b's prompt ends in the last prefilled column, `pad[b]` columns are masked for
it, and its rotary positions start at 0 in column pad[b], so each row computes what it would
alone.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch

from matformer.inference import decode_step, row_kernel
from matformer.inference.compile_cache import (
    PrecompiledStep,
    compiled_graphs,
    enable_compile_cache,
    record_compile_seconds,
    record_native_call,
)
from matformer.inference.half_on_cpu import half_on_cpu
from matformer.inference.huge_pages import weights_on_huge_pages
from matformer.inference.matvec import CpuMatvec
from matformer.models.lm.model import KVCache, MatFormerLM
from matformer.tiers import Setting

PLANS_KEPT = 4
"""`decode_step` plans a decoder keeps (a target and its drafts): each narrower setting's plan
holds copies of its column slices, so an evaluation over many settings keeps only the last few."""

RECOMPILE_LIMIT = 64
"""Graphs dynamo keeps per compiled function: widths x token counts x models of one process."""


def _forward(model: MatFormerLM, ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache,
             pad: torch.Tensor, last_only: bool) -> torch.Tensor:
    return model.forward_static(ids, input_pos, cache, pad, last_only)


def _compiled_step(model: MatFormerLM, ids: torch.Tensor, input_pos: torch.Tensor,
                   cache: KVCache, pad: torch.Tensor, last_only: bool) -> torch.Tensor:
    """`_forward` as it is compiled: few-row products on a CPU become reductions that inductor
    fuses and streams at the memory's rate (`matvec.CpuMatvec`; a no-op elsewhere)."""
    with CpuMatvec():
        return model.forward_static(ids, input_pos, cache, pad, last_only)


@functools.cache
def compiled_forward(mode: str | None = None, backend: str | Callable = "inductor") -> Callable:
    """`_compiled_step` compiled (one wrapper per mode and backend, so its graphs are kept); the
    kernels inductor builds are kept on disk for later processes (`enable_compile_cache`). With
    inductor's default mode (the CPU's) each graph is precompiled and kept whole, so a later
    process loads it without tracing (`PrecompiledStep`)."""
    enable_compile_cache()
    import torch._inductor.inductor_prims  # noqa: F401  (matvec's prims.inductor_force_stride_order)

    if backend == "inductor" and mode is None:
        return PrecompiledStep(_compiled_step, backend, mode)
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    return torch.compile(_compiled_step, mode=mode, backend=backend, dynamic=False, fullgraph=True)


def _canonical(ids: torch.Tensor) -> torch.Tensor:
    """Token ids (B, T) as the compiled step always sees them (call in inference mode): an
    inference tensor with contiguous strides, so neither a strided slice nor a tensor made
    outside inference mode makes another graph. Copies only when `ids` is not already that."""
    if ids.is_inference() and ids.stride() == (ids.shape[1], 1):
        return ids
    return ids.clone(memory_format=torch.contiguous_format)


def default_compile_mode(device: torch.device) -> str | None:
    return "reduce-overhead" if device.type == "cuda" else None


class StaticDecoder:
    """Decoding state of one model over `batch_size` rows: the static cache, the column
    `pos` every row has filled, and each row's left padding. `compile`: run the one-token step
    and the verify through `torch.compile` (`backend` for tests that count compiles)."""

    def __init__(self, model: MatFormerLM, batch_size: int, max_len: int, *,
                 compile: bool = False, backend: str | Callable = "inductor",
                 mode: str | None = None) -> None:
        self.model = model
        self.device = model.model.embed_tokens.weight.device
        if self.device.type == "cpu":  # a step streams every weight: keep them on huge pages
            weights_on_huge_pages(model)
            if compile:
                row_kernel.refresh()
        with torch.inference_mode():  # as every forward runs: no graph per tensor kind
            self.cache = model.new_cache(batch_size, max_len)
            self.pad = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.pos = 0
        self.compiled = compile
        self.native = compile and self.device.type == "cpu" and decode_step.wanted()
        """One-token steps of one sequence run as one C++ call (`decode_step`) where it covers
        the model: a compiled CPU decoder with the C++ kernels on."""
        self._plans: dict[tuple, decode_step.DecodePlan | None] = {}
        self._slots = model._width_slots() if self.native else []
        self.cuda_graphs = False
        self._step: Callable = _forward
        if compile:
            mode = mode if mode is not None else default_compile_mode(self.device)
            self.cuda_graphs = mode == "reduce-overhead"
            self._step = compiled_forward(mode, backend)
            if self.cuda_graphs:
                for t in (*self.cache.k, *self.cache.v, self.pad):
                    torch._dynamo.mark_static_address(t)

    @property
    def batch_size(self) -> int:
        return self.pad.shape[0]

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def prefill(self, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Write the prompts (1-D token tensors, one per row, any lengths) into columns
        0..P-1 (P the longest), left-padded; returns each row's last logits (B, V). Eager."""
        P = max(p.shape[0] for p in prompts)
        with torch.inference_mode():
            ids = torch.zeros(len(prompts), P, dtype=torch.long, device=self.device)
            for b, p in enumerate(prompts):
                ids[b, P - p.shape[0]:] = p
            self.pad.copy_(torch.tensor([P - p.shape[0] for p in prompts], device=self.device))
            self.pos = 0
            cols = torch.arange(P, device=self.device)
            with half_on_cpu(self.model):
                logits = _forward(self.model, ids, cols, self.cache, self.pad, True)[:, 0]
        self.pos = P
        return logits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens ids (B, T) in the next T columns -> logits (B, T, V) at the model's current
        width (T=1: a decoding step; T=k+1: a verify)."""
        T = ids.shape[1]
        native = self.native and ids.shape[0] == 1 and T <= decode_step.MAX_ROWS
        plan = self._plan() if native else None
        if plan is not None:
            with torch.inference_mode():
                out = plan(ids[0].tolist(), self.pos, int(self.pad[0]))
            record_native_call()
            self.pos += T
            return out
        with torch.inference_mode():
            ids = _canonical(ids)
            cols = torch.arange(self.pos, self.pos + T, device=self.device)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            graphs, t0 = (compiled_graphs(), time.perf_counter()) if self.compiled else (0, 0.0)
            out = self._step(self.model, ids, cols, self.cache, self.pad, False)
            if self.compiled and compiled_graphs() != graphs:  # this call compiled: its time
                record_compile_seconds(time.perf_counter() - t0)
            out = out.clone() if self.cuda_graphs else out
        self.pos += T
        return out

    def _plan(self) -> decode_step.DecodePlan | None:
        """The model's `decode_step` plan at its active setting (made once per setting), or None
        where the step does not cover it."""
        # the setting read off the modules directly (the model's `widths` and `layer_kv_heads`
        # go through nn.Module attribute lookups: 25 us a step at 6 layers)
        key = (*(f.width for f, _ in self._slots), *(a.kv_heads for _, a in self._slots),
               self.model.model.embed_tokens.weight.data_ptr(),
               self.model.lm_head.weight.data_ptr())  # weights replaced (a dtype change): a new plan
        plan = self._plans.get(key)
        if key not in self._plans or (plan is not None and not plan.fresh()):
            why = decode_step.why_not(self.model, self.cache)
            with torch.inference_mode():
                plan = None if why else decode_step.plan(self.model, self.cache)
            self._plans.pop(key, None)
            self._plans[key] = plan
            while len(self._plans) > PLANS_KEPT:  # the least recently made (and its copies)
                del self._plans[next(iter(self._plans))]
        return plan

    def greedy_round(self, draft: Setting, target: Setting, token: int,
                     k: int) -> tuple[list[int], list[int]] | None:
        """A greedy speculative round inside one model as one C++ call (`decode_step.
        greedy_round`): `k` drafts from `token` at the setting `draft`, then the verify at
        `target` (the model is left there); returns (the drafts, the target's argmax after each
        of the k + 1 tokens), the columns of all k + 1 written (crop to the accepted ones).
        None, and nothing run, where the step does not cover both settings (then draft and
        verify as separate calls)."""
        if not (self.native and self.batch_size == 1 and 1 <= k < decode_step.MAX_ROWS):
            return None
        self.model.apply(draft)
        draft_plan = self._plan()
        self.model.apply(target)
        plan = self._plan()
        if plan is None or draft_plan is None:
            return None
        with torch.inference_mode():
            drafts, best = decode_step.greedy_round(plan, draft_plan, token, k, self.pos,
                                                    int(self.pad[0]))
        record_native_call(k + 1)
        self.pos += k + 1
        return drafts, best

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per row (B, 1) -> next-token logits (B, V)."""
        return self.forward(ids)[:, -1]

    def crop(self, pos: int) -> None:
        """Forget columns pos.. (their stale entries stay, masked: no query sees a column
        beyond its own)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot crop a decoder at column {self.pos} to {pos}")
        self.pos = pos

    def finish(self) -> KVCache:
        """The cache, with `length` set to the filled columns (for inspection)."""
        self.cache.length = self.pos
        return self.cache
