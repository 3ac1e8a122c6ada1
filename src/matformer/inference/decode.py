"""Text generation at any width: one sequence, or a batch of prompts of different lengths.

- `generate(model, prompt, ...)`: greedy (temperature 0) or sampled (temperature, top-k, top-p,
  seed) decoding with a preallocated KV cache, at the model's current width or at the tier/widths
  given for this call (the previous width is restored afterwards, so one loaded model can serve
  any width call after call without reloading). `compile=True` decodes through
  `decoding.StaticDecoder`'s compiled step (static cache, one graph per width, CUDA graphs on a
  GPU); the eager default runs the model's forward with a growing cache slice.
- `generate_batch(model, prompts, ...)`: several prompts at once on one static cache (left-padded,
  masked, per-row rotary positions), every row at the model's current width; a row's greedy
  output is the one it gets alone.
- The sampling (`Sampler`) stays on the logits' device; only the picked token ids are read back.

The outputs and the sampler are `matformer.inference.sampling` (re-exported here); speculative
decoding is `matformer.inference.speculative`; text in, text out is `matformer.inference.text`.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Sequence

import torch

from matformer.errors import DataError
from matformer.inference.compile_cache import compile_stats
from matformer.inference.half_on_cpu import half_on_cpu
from matformer.inference.sampling import (  # noqa: F401  (the outputs are re-exported here)
    GenerationOutput,
    GenerationStats,
    Sampler,
    StreamCallback,
    call_setting,
    check_lengths,
    emit_token,
    prompt_ids,
    sampler_and_eos,
    sync_device,
)
from matformer.inference.static_cache import StaticDecoder
from matformer.models.lm.model import MatFormerLM
from matformer.tiers import WidthRequest

# ---- plain decoding --------------------------------------------------------------------------


def generate(
    model: MatFormerLM,
    prompt: Sequence[int] | torch.Tensor,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
    stream: StreamCallback | None = None,
    tier: int | None = None,
    layer_tiers: Sequence[int] | None = None,
    widths: int | Sequence[int] | None = None,
    use_cache: bool = True,
    compile: bool = False,
    kv_heads: int | None = None,
    layer_kv_heads: Sequence[int] | None = None,
) -> GenerationOutput:
    """Decode up to `max_new_tokens` tokens after `prompt` (token ids, one sequence).

    Width: `tier`/`layer_tiers`/`widths` and KV heads: `kv_heads`/`layer_kv_heads` for this call
    only (restored afterwards); an axis not named runs at the model's current setting. Stops after an EOS (`eos_token_id`, default the config's) unless
    `ignore_eos`. `use_cache=False` recomputes the whole sequence every step (a reference for
    tests; same tokens, much slower). `compile=True`: the static-cache compiled step (the first
    call at a width compiles it; later calls reuse it).
    """
    request = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths, kv_heads=kv_heads,
                           layer_kv_heads=layer_kv_heads)
    device = model.model.embed_tokens.weight.device
    sampler, eos = sampler_and_eos(model, device, temperature, top_k, top_p, seed, eos_token_id,
                                   ignore_eos)
    if compile and use_cache:
        return decode_batch(model, [prompt], max_new_tokens, request, sampler, eos,
                            stream=stream, compile=True)[0]
    ids = prompt_ids(prompt, device, model.config.vocab_size)  # (1, P)
    P = ids.shape[1]
    max_len = check_lengths(model, P, max_new_tokens)
    stats = GenerationStats(prompt_tokens=P)
    out: list[int] = []
    setting = call_setting(model, request)
    with (model.running(setting) if setting else contextlib.nullcontext(),
          torch.inference_mode()):
        run_widths, run_heads = model.widths, model.layer_kv_heads
        t0 = time.perf_counter()
        cache = model.new_cache(1, max_len) if use_cache else None
        seq = ids
        with half_on_cpu(model):
            logits = model(ids, cache=cache)[0, -1]  # (V,)
        stats.target_forwards += 1
        while True:
            tok = int(sampler.pick(logits))
            if not out:
                stats.prefill_seconds = time.perf_counter() - t0
            if emit_token(tok, out, stream, eos, stats) or len(out) >= max_new_tokens:
                break
            nxt = torch.tensor([[tok]], device=device)
            if cache is not None:
                logits = model(nxt, cache=cache)[0, -1]
            else:
                seq = torch.cat([seq, nxt], dim=1)
                logits = model(seq)[0, -1]
            stats.target_forwards += 1
        sync_device(device)
        stats.seconds = time.perf_counter() - t0
    stats.new_tokens = len(out)
    return GenerationOutput(tokens=out, prompt=ids[0].tolist(), widths=run_widths, stats=stats,
                            kv_heads=run_heads)


# ---- batched decoding on the static cache -----------------------------------------------------


_DECODERS: weakref.WeakKeyDictionary[MatFormerLM, dict[tuple, StaticDecoder]] = (
    weakref.WeakKeyDictionary())


def static_decoder(model: MatFormerLM, batch_size: int, min_len: int, *,
                   compile: bool = False) -> StaticDecoder:
    """A `StaticDecoder` of at least `min_len` columns. Compiled ones are kept per model and
    their length rounded up to a multiple of 128 (capped at the context), so later calls find
    the same shapes, the same cache tensors and so the same graphs."""
    if not compile:
        return StaticDecoder(model, batch_size, min_len)
    ctx = model.config.max_position_embeddings
    max_len = min(ctx, -(-min_len // 128) * 128)
    kept = _DECODERS.setdefault(model, {})
    key = (batch_size, max_len, tuple(model.layer_kv_heads))  # the cache holds the active heads
    if key not in kept:
        kept[key] = StaticDecoder(model, batch_size, max_len, compile=True)
    return kept[key]


SYNC_EVERY = 16
"""Decoding steps between reads of the picked tokens by the host (generate_batch)."""


def _take(chunk: list[list[int]], going: list[int], outs: list[list[int]],
          stats: list[GenerationStats], eos: set[int], max_new_tokens: int,
          stream: StreamCallback | None) -> list[int]:
    """Append a chunk of picked tokens (steps x rows) to the rows still going, stopping each row
    at its EOS or its last token; returns the rows still going."""
    for toks in chunk:
        for b in going:
            outs[b].append(toks[b])
            if toks[b] in eos:
                stats[b].stop_reason = "eos"
        if stream is not None and 0 in going:
            stream([toks[0]])
        going = [b for b in going if stats[b].stop_reason != "eos"
                 and len(outs[b]) < max_new_tokens]
        if not going:
            break
    return going


def generate_batch(
    model: MatFormerLM,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
    stream: StreamCallback | None = None,
    tier: int | None = None,
    layer_tiers: Sequence[int] | None = None,
    widths: int | Sequence[int] | None = None,
    compile: bool = False,
    kv_heads: int | None = None,
    layer_kv_heads: Sequence[int] | None = None,
) -> list[GenerationOutput]:
    """Decode after each of `prompts` (token id lists of any lengths) at once, one row each,
    on one static cache; arguments as `generate` (`stream` sees row 0's tokens). A row stops
    at its EOS (the batch runs on while any row is going; a finished row's later tokens are
    dropped). Every row's `stats.seconds` is the wall time of the whole batch."""
    device = model.model.embed_tokens.weight.device
    sampler, eos = sampler_and_eos(model, device, temperature, top_k, top_p, seed, eos_token_id,
                                   ignore_eos)
    request = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths, kv_heads=kv_heads,
                           layer_kv_heads=layer_kv_heads)
    return decode_batch(model, prompts, max_new_tokens, request, sampler, eos, stream=stream,
                        compile=compile)


def decode_batch(model: MatFormerLM, prompts: Sequence[Sequence[int] | torch.Tensor],
                 max_new_tokens: int, request: WidthRequest, sampler: Sampler, eos: set[int], *,
                 stream: StreamCallback | None = None,
                 compile: bool = False) -> list[GenerationOutput]:
    """`generate_batch` with its width `request`, sampler and stop tokens already built (also
    `generate(compile=True)`'s path)."""
    if not prompts:
        raise DataError("no prompts: give at least one")
    device = model.model.embed_tokens.weight.device
    rows = [prompt_ids(p, device, model.config.vocab_size)[0] for p in prompts]
    max_len = check_lengths(model, max(r.shape[0] for r in rows), max_new_tokens)
    stats = [GenerationStats(prompt_tokens=r.shape[0]) for r in rows]
    outs: list[list[int]] = [[] for _ in rows]
    setting = call_setting(model, request)
    compiling = compile_stats()
    with (model.running(setting) if setting else contextlib.nullcontext(),
          torch.inference_mode()):
        run_widths, run_heads = model.widths, model.layer_kv_heads
        dec = static_decoder(model, len(rows), max_len, compile=compile)
        t0 = time.perf_counter()
        logits = dec.prefill(rows)  # (B, V)
        sync_device(device)
        prefill = time.perf_counter() - t0
        # Picked tokens stay on the device and are read back every `every` steps (each read is a
        # host-device sync): the host queues the next steps while the device runs, as gpt-fast
        # does. A row past its EOS computes at most every-1 dropped tokens; `stream` reads each.
        every = 1 if stream is not None else SYNC_EVERY
        forwards, pending, going = 1, [], list(range(len(rows)))
        while True:
            picked = sampler.pick(logits)  # (B,) on the device
            pending.append(picked)
            if len(pending) == every or forwards == max_new_tokens:
                going = _take(torch.stack(pending).tolist(), going, outs, stats, eos,
                              max_new_tokens, stream)
                pending = []
                if not going:
                    break
            logits = dec.step(picked.view(-1, 1))
            forwards += 1
        sync_device(device)
        seconds = time.perf_counter() - t0
    compiling = compile_stats().since(compiling)  # what this call compiled, in `seconds`
    results = []
    for r, out, st in zip(rows, outs, stats, strict=True):
        st.new_tokens, st.seconds, st.prefill_seconds = len(out), seconds, prefill
        st.target_forwards = forwards
        results.append(GenerationOutput(tokens=out, prompt=r.tolist(), widths=run_widths,
                                        stats=st, extra={"compiled": compile, **(
                                            {"compile": compiling} if compile else {})},
                                        kv_heads=run_heads))
    return results
