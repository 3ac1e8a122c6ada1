"""Text generation at any width, and speculative decoding inside one elastic model.

- `generate(model, prompt, ...)`: greedy (temperature 0) or sampled (temperature, top-k, top-p,
  seed) decoding with a preallocated KV cache, at the model's current width or at the tier/widths
  given for this call (the previous width is restored afterwards, so one loaded model can serve
  any width call after call without reloading).
- `speculative_generate(model, prompt, ...)`: a small width of the same model drafts `k` tokens,
  the target width verifies them in one forward. Draft and verifier share ONE KV cache: before
  verifying, the cache is cropped back to the verified prefix and the verify forward writes its
  own keys/values over the draft's, so every position the output keeps holds the verifier's
  entries (the paper's "shared cache"). Greedy output is token-for-token the target width's
  greedy output; with sampling the standard rule (accept a draft token d with probability
  min(1, p(d)/q(d)), else resample from norm(max(0, p - q))) leaves the output distributed as
  the target width's (processed) distribution p.

Both work on one sequence (batch 1), the case decoding latency matters for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import ConfigError, DataError
from .model import KVCache, MatFormerLM
from .tiers import runnable_tiers

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


def _requested(tier: int | None, layer_tiers: Sequence[int] | None,
               widths: int | Sequence[int] | None) -> dict[str, Any] | None:
    """The width request of one call as `set_widths` keywords, or None when none was made."""
    if tier is None and layer_tiers is None and widths is None:
        return None
    return {"tier": tier, "layer_tiers": layer_tiers, "widths": widths}


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
) -> GenerationOutput:
    """Decode up to `max_new_tokens` tokens after `prompt` (token ids, one sequence).

    Width: `tier`/`layer_tiers`/`widths` for this call only (restored afterwards), else the model's
    current setting. Stops after an EOS (`eos_token_id`, default the config's) unless
    `ignore_eos`. `use_cache=False` recomputes the whole sequence every step (a reference for
    tests; same tokens, much slower).
    """
    device = model.model.embed_tokens.weight.device
    ids = _prompt_ids(prompt, device, model.config.vocab_size)  # (1, P)
    P = ids.shape[1]
    max_len = _check_lengths(model, P, max_new_tokens)
    sampler = Sampler(temperature, top_k, top_p, seed, device)
    eos = set() if ignore_eos else _eos_set(model, eos_token_id)
    stats = GenerationStats(prompt_tokens=P)
    out: list[int] = []
    request = _requested(tier, layer_tiers, widths)
    with (model.at_width(**request) if request else contextlib.nullcontext(),
          torch.inference_mode()):
        run_widths = model.widths
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
    return GenerationOutput(tokens=out, prompt=ids[0].tolist(), widths=run_widths, stats=stats)



# ---- speculative decoding ----------------------------------------------------------------------


def speculative_generate(
    model: MatFormerLM,
    prompt: Sequence[int] | torch.Tensor,
    max_new_tokens: int = 64,
    *,
    draft_tier: int | None = None,
    draft_layer_tiers: Sequence[int] | None = None,
    draft_widths: int | Sequence[int] | None = None,
    draft_tokens: int | str = 4,
    max_draft_tokens: int = 16,
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
    return_cache: bool = False,
) -> GenerationOutput:
    """Speculative decoding within one model: draft at the draft width, verify at the target.

    Target width: `tier`/`layer_tiers`/`widths`, else the model's current setting. Draft width:
    `draft_tier`/`draft_layer_tiers`/`draft_widths`, else the smallest tier the model can run
    (at most tier 3). `draft_tokens`: k tokens drafted per round, or "adaptive" (start at 4; +2
    after a round whose drafts were all accepted, -1 after a rejection; within
    1..`max_draft_tokens`).

    Cache invariant: before each round the cache holds the verifier's entries for every token
    but the last one emitted (`cur`). The draft feeds cur, d1 .. d(k-1) (writing draft entries at
    those positions); the cache is then cropped back and the verifier feeds cur, d1 .. dk in one
    forward, overwriting them with its own; finally it is cropped to the accepted prefix.
    `return_cache=True` puts that cache in `output.extra["cache"]` (for inspection).
    """
    device = model.model.embed_tokens.weight.device
    ids = _prompt_ids(prompt, device, model.config.vocab_size)  # (1, P)
    P = ids.shape[1]
    max_len = _check_lengths(model, P, max_new_tokens)
    sampler = Sampler(temperature, top_k, top_p, seed, device)
    eos = set() if ignore_eos else _eos_set(model, eos_token_id)
    k, adaptive = _first_draft_length(draft_tokens, max_draft_tokens)
    target, draft = _target_and_draft(model, _requested(tier, layer_tiers, widths),
                                      _requested(draft_tier, draft_layer_tiers, draft_widths))

    stats = GenerationStats(prompt_tokens=P)
    out: list[int] = []
    # at_width restores the caller's widths on exit, whatever draft/target switching happened.
    with model.at_width(widths=target), torch.inference_mode():
        t0 = time.perf_counter()
        cache = model.new_cache(1, max_len)
        cur = _prefill(model, ids, cache, stats)  # (1, 1): emitted, not yet in the cache
        stats.prefill_seconds = time.perf_counter() - t0
        while stats.stop_reason != "eos" and len(out) < max_new_tokens:
            start = cache.length
            # One token always comes from the verifier, so at most remaining-1 drafts count.
            kk = min(k, max_new_tokens - len(out) - 1)
            drafts, q_rows = _draft(model, cache, cur, kk, draft, sampler, stats)
            model.set_widths(widths=target)
            # ---- verify cur, d1..dk at the target width in one forward
            block = torch.cat([cur, *drafts], dim=1)  # (1, kk+1)
            p_logits = model(block, cache=cache)[0]  # (kk+1, V); cache now start+kk+1
            stats.target_forwards += 1
            n, new = _verify(sampler, p_logits, block[0, 1:], q_rows)
            stats.drafted += kk
            stats.accepted += n
            cache.crop(start + 1 + n)  # keep the verifier's entries for cur and the n accepted
            new = _emit(new, eos, max_new_tokens - len(out), stats)
            out.extend(new)
            if stream is not None and new:
                stream(new)
            cur = torch.tensor([[new[-1]]], device=device)
            if adaptive:
                k = min(k + 2, max_draft_tokens) if n == kk and kk > 0 else max(1, k - 1)
        _sync(device)
        stats.seconds = time.perf_counter() - t0
    stats.new_tokens = len(out)
    extra = {"cache": cache} if return_cache else {}
    return GenerationOutput(tokens=out, prompt=ids[0].tolist(), widths=list(target), stats=stats,
                            draft_widths=list(draft), extra=extra)


def _target_and_draft(model: MatFormerLM, target: dict[str, Any] | None,
                      draft: dict[str, Any] | None) -> tuple[list[int], list[int]]:
    """Per-layer widths of the verifier (default: the model's current widths) and of the draft
    (default: `default_draft_tier`) for these `set_widths` requests."""
    return (model.resolve_widths(**target) if target else model.widths,
            model.resolve_widths(**(draft or {"tier": default_draft_tier(model)})))


def _prefill(model: MatFormerLM, ids: torch.Tensor, cache: KVCache,
             stats: GenerationStats) -> torch.Tensor:
    """Write the verifier's entries for the prompt `ids` (1, P) but its last token into `cache`;
    returns that last token (1, 1), emitted but not yet in the cache."""
    if ids.shape[1] > 1:
        model(ids[:, :-1], cache=cache)
        stats.target_forwards += 1
    _sync(ids.device)
    return ids[:, -1:]


def _first_draft_length(draft_tokens: int | str, max_draft_tokens: int) -> tuple[int, bool]:
    """(tokens drafted in the first round, adaptive?) for a `draft_tokens` setting."""
    if draft_tokens == "adaptive":
        return min(4, max_draft_tokens), True
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ConfigError(f"draft_tokens must be a positive integer or 'adaptive', got {draft_tokens!r}")
    return draft_tokens, False


def _draft(model: MatFormerLM, cache: KVCache, cur: torch.Tensor, kk: int, draft: list[int],
           sampler: Sampler, stats: GenerationStats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Draft `kk` tokens after `cur` at the `draft` widths. Their cache entries are temporary:
    the cache is cropped back to where it was. Returns the drafts ((1, 1) each) and, when
    sampling, the processed draft distributions ((V,) each) the acceptance rule needs."""
    drafts: list[torch.Tensor] = []
    q_rows: list[torch.Tensor] = []
    if kk == 0:
        return drafts, q_rows
    start = cache.length
    model.set_widths(widths=draft)
    tok = cur
    for _ in range(kk):
        q_logits = model(tok, cache=cache)[0, -1]  # (V,)
        stats.draft_forwards += 1
        if sampler.greedy:
            tok = q_logits.argmax(-1).view(1, 1)
        else:
            q = sampler.probs(q_logits)
            q_rows.append(q)
            tok = sampler.draw(q).view(1, 1)
        drafts.append(tok)
    cache.crop(start)
    return drafts, q_rows


def _verify(sampler: Sampler, p_logits: torch.Tensor, d: torch.Tensor,
            q_rows: list[torch.Tensor]) -> tuple[int, list[int]]:
    """The verifier's decision on drafts `d` (kk,) from its logits (kk+1, V): (accepted count
    n, the tokens to emit: d[:n] and one token of the verifier's own)."""
    kk = d.shape[0]
    if sampler.greedy:
        best = p_logits.argmax(-1)  # (kk+1,)
        agree = (best[:kk] == d).tolist()
        n = agree.index(False) if False in agree else kk
        return n, d[:n].tolist() + [int(best[n])]
    p = sampler.probs(p_logits)  # (kk+1, V)
    if kk == 0:
        return 0, [int(sampler.draw(p[0]))]
    q = torch.stack(q_rows)  # (kk, V)
    rows = torch.arange(kk, device=p.device)
    p_d, q_d = p[rows, d], q[rows, d]
    # accept d_i with probability min(1, p/q): u*q <= p avoids dividing
    ok = (sampler.uniform(kk, p.device) * q_d <= p_d).tolist()
    n = ok.index(False) if False in ok else kk
    if n < kk:
        resid = (p[n] - q[n]).clamp_min(0.0)
        total = resid.sum()
        # p == q exactly leaves no residual (and rejection had probability 0)
        last = int(sampler.draw(resid / total if float(total) > 0 else p[n]))
    else:
        last = int(sampler.draw(p[kk]))
    return n, d[:n].tolist() + [last]


def _emit(new: list[int], eos: set[int], room: int, stats: GenerationStats) -> list[int]:
    """`new` cut after the first EOS (recorded as the stop reason) and to `room` tokens."""
    for j, t in enumerate(new):
        if t in eos:
            new = new[: j + 1]
            stats.stop_reason = "eos"
            break
    return new[:room]
