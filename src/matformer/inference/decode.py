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

Speculative decoding is `matformer.inference.speculative`.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from matformer.errors import ConfigError, DataError
from matformer.inference.static_cache import StaticDecoder
from matformer.models.lm.model import MatFormerLM
from matformer.tiers import runnable_tiers

StreamCallback = Callable[[list[int]], None]
"""Called with the tokens emitted by each decoding step (one token, or several accepted ones)."""


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int = 0
    seconds: float = 0.0
    """Wall time of the whole call, prompt processing included."""
    target_forwards: int = 0
    """Forwards at the target width (the prompt's counts as one)."""
    draft_forwards: int = 0
    drafted: int = 0
    """Draft tokens proposed to the verifier."""
    accepted: int = 0
    """Draft tokens the verifier kept."""
    stop_reason: str = "length"
    """'eos' or 'length'."""
    prefill_seconds: float = 0.0
    """Time to the first new token (the prompt's forward and the first pick)."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second of decoding (the prompt's forward excluded)."""
        t = self.seconds - self.prefill_seconds
        return (self.new_tokens - 1) / t if self.new_tokens > 1 and t > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        d["acceptance_rate"] = self.acceptance_rate
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclass
class GenerationOutput:
    tokens: list[int]
    """The new tokens (the prompt not included; an EOS that stopped decoding is included)."""
    prompt: list[int]
    widths: list[int]
    """Per-layer FFN widths the output was decoded at (the target width)."""
    stats: GenerationStats
    draft_widths: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    kv_heads: list[int] | None = None
    """Per-layer KV heads the output was decoded at (the target's)."""
    draft_kv_heads: list[int] | None = None

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.tokens


# ---- sampling ------------------------------------------------------------------------------


class Sampler:
    """Turns logits into the processed distribution (temperature, top-k, top-p) and draws from
    it with its own seeded generator. Temperature 0 is greedy (argmax)."""

    def __init__(self, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = top_p
        self.greedy = self.temperature == 0.0
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) -> processed probabilities (..., V), float32."""
        x = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = torch.topk(x, self.top_k, dim=-1).values[..., -1:]  # (..., 1)
            x = x.masked_fill(x < kth, float("-inf"))
        p = torch.softmax(x, dim=-1)
        if self.top_p is not None and self.top_p < 1.0:
            sp, idx = torch.sort(p, dim=-1, descending=True)
            # Drop a token when the tokens ranked above it already hold top_p of the mass; the
            # most likely token is always kept.
            drop_sorted = (sp.cumsum(-1) - sp) >= self.top_p
            drop = drop_sorted.scatter(-1, idx, drop_sorted)
            p = p.masked_fill(drop, 0.0)
            p = p / p.sum(-1, keepdim=True)
        return p

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (..., V) -> token ids (...,) drawn with this sampler's generator."""
        flat = probs.reshape(-1, probs.shape[-1])
        out = torch.multinomial(flat, 1, generator=self.generator)  # (N, 1)
        return out.reshape(probs.shape[:-1])

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) -> next token ids (...,)."""
        if self.greedy:
            return logits.argmax(-1)
        return self.draw(self.probs(logits))

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=device)


# ---- helpers -------------------------------------------------------------------------------


def _prompt_ids(prompt: Any, device: torch.device, vocab_size: int) -> torch.Tensor:
    """A prompt as token ids (1, P): a list of ints, a 1-D tensor, or a (1, P) tensor, each id
    in 0..vocab_size-1."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.detach()
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise DataError(
                    f"generation decodes one sequence; got a batch of {ids.shape[0]} prompts"
                )
            ids = ids[0]
        if ids.dim() != 1:
            raise DataError(f"prompt must be a 1-D list of token ids, got shape {tuple(prompt.shape)}")
        ids = ids.long()
    else:
        try:
            ids = torch.tensor([int(t) for t in prompt], dtype=torch.long)
        except (TypeError, ValueError):
            raise DataError("prompt must be a sequence of integer token ids") from None
    if ids.numel() == 0:
        raise DataError("the prompt is empty; give at least one token")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(f"the prompt holds token id {lo if lo < 0 else hi}, outside the model's "
                        f"vocabulary of {vocab_size}; tokenize it with this model's tokenizer")
    return ids.to(device).unsqueeze(0)


def _eos_set(model: MatFormerLM, eos_token_id: int | Sequence[int] | None) -> set[int]:
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _check_lengths(model: MatFormerLM, prompt_len: int, max_new_tokens: int) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    ctx = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > ctx:
        room = ctx - prompt_len
        hint = (f"ask for at most {room} new tokens" if room > 0
                else "shorten the prompt")
        raise DataError(
            f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {ctx} positions (max_position_embeddings); {hint}"
        )
    return prompt_len + max_new_tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sampling(model: MatFormerLM, device: torch.device, temperature: float, top_k: int | None,
              top_p: float | None, seed: int | None, eos_token_id: int | Sequence[int] | None,
              ignore_eos: bool) -> tuple[Sampler, set[int]]:
    """The sampler and the stop tokens of one decoding call (every decoding entry point)."""
    return (Sampler(temperature, top_k, top_p, seed, device),
            set() if ignore_eos else _eos_set(model, eos_token_id))


def _requested(tier: int | None, layer_tiers: Sequence[int] | None,
               widths: int | Sequence[int] | None, kv_heads: int | None = None,
               layer_kv_heads: Sequence[int] | None = None) -> dict[str, Any] | None:
    """The width (and KV head) request of one call: the keywords given, or None when none was
    made (an FFN-only request suits `resolve_widths`, a heads-only one `resolve_kv_heads`)."""
    given = {"tier": tier, "layer_tiers": layer_tiers, "widths": widths, "kv_heads": kv_heads,
             "layer_kv_heads": layer_kv_heads}
    return {k: v for k, v in given.items() if v is not None} or None


_FFN_KEYS = ("tier", "layer_tiers", "widths")


def _call_setting(model: MatFormerLM, request: dict[str, Any] | None) -> dict[str, Any] | None:
    """The full setting (`set_widths` keywords) one call runs at: each axis the request names,
    the model's current setting on the other; None for no request."""
    if request is None:
        return None
    ffn = {k: v for k, v in request.items() if k in _FFN_KEYS}
    heads = {k: v for k, v in request.items() if k not in _FFN_KEYS}
    return {"widths": model.resolve_widths(**ffn) if ffn else model.widths,
            "layer_kv_heads": model.resolve_kv_heads(**heads) if heads else model.layer_kv_heads}


def default_draft_tier(model: MatFormerLM, limit: int = 3) -> int:
    """The smallest tier (at most `limit`, the paper's S = tier 3) the model can run."""
    return runnable_tiers(model.base_width, model.stored_widths, limit=limit + 1)[-1]


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
    if compile and use_cache:
        return generate_batch(
            model, [prompt], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, eos_token_id=eos_token_id, ignore_eos=ignore_eos, stream=stream,
            tier=tier, layer_tiers=layer_tiers, widths=widths, compile=True, kv_heads=kv_heads,
            layer_kv_heads=layer_kv_heads)[0]
    device = model.model.embed_tokens.weight.device
    ids = _prompt_ids(prompt, device, model.config.vocab_size)  # (1, P)
    P = ids.shape[1]
    max_len = _check_lengths(model, P, max_new_tokens)
    sampler, eos = _sampling(model, device, temperature, top_k, top_p, seed, eos_token_id,
                             ignore_eos)
    stats = GenerationStats(prompt_tokens=P)
    out: list[int] = []
    setting = _call_setting(model, _requested(tier, layer_tiers, widths, kv_heads, layer_kv_heads))
    with (model.at_width(**setting) if setting else contextlib.nullcontext(),
          torch.inference_mode()):
        run_widths, run_heads = model.widths, model.layer_kv_heads
        t0 = time.perf_counter()
        cache = model.new_cache(1, max_len) if use_cache else None
        seq = ids
        logits = model(ids, cache=cache)[0, -1]  # (V,)
        stats.target_forwards += 1
        while True:
            tok = int(sampler.pick(logits))
            if not out:
                stats.prefill_seconds = time.perf_counter() - t0
            out.append(tok)
            if stream is not None:
                stream([tok])
            if tok in eos:
                stats.stop_reason = "eos"
                break
            if len(out) >= max_new_tokens:
                break
            nxt = torch.tensor([[tok]], device=device)
            if cache is not None:
                logits = model(nxt, cache=cache)[0, -1]
            else:
                seq = torch.cat([seq, nxt], dim=1)
                logits = model(seq)[0, -1]
            stats.target_forwards += 1
        _sync(device)
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
    if not prompts:
        raise DataError("no prompts: give at least one")
    device = model.model.embed_tokens.weight.device
    rows = [_prompt_ids(p, device, model.config.vocab_size)[0] for p in prompts]
    max_len = _check_lengths(model, max(r.shape[0] for r in rows), max_new_tokens)
    sampler, eos = _sampling(model, device, temperature, top_k, top_p, seed, eos_token_id,
                             ignore_eos)
    stats = [GenerationStats(prompt_tokens=r.shape[0]) for r in rows]
    outs: list[list[int]] = [[] for _ in rows]
    setting = _call_setting(model, _requested(tier, layer_tiers, widths, kv_heads, layer_kv_heads))
    with (model.at_width(**setting) if setting else contextlib.nullcontext(),
          torch.inference_mode()):
        run_widths, run_heads = model.widths, model.layer_kv_heads
        dec = static_decoder(model, len(rows), max_len, compile=compile)
        t0 = time.perf_counter()
        logits = dec.prefill(rows)  # (B, V)
        _sync(device)
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
        _sync(device)
        seconds = time.perf_counter() - t0
    results = []
    for r, out, st in zip(rows, outs, stats, strict=True):
        st.new_tokens, st.seconds, st.prefill_seconds = len(out), seconds, prefill
        st.target_forwards = forwards
        results.append(GenerationOutput(tokens=out, prompt=r.tolist(), widths=run_widths,
                                        stats=st, extra={"compiled": compile},
                                        kv_heads=run_heads))
    return results
