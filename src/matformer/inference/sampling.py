"""What every decoding entry point shares: the outputs, the sampler, and the checks of a call.

`GenerationOutput`/`GenerationStats` are what `generate`, `generate_batch` and
`speculative_generate` return; `Sampler` turns logits into tokens (temperature, top-k, top-p,
seed) on the logits' device; the functions below read a call's prompt, stop tokens, lengths and
width request once, the same way for plain (`inference.decode`) and speculative
(`inference.speculative`) decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from matformer.errors import ConfigError, DataError
from matformer.models.lm.model import MatFormerLM
from matformer.tiers import Setting, WidthRequest, runnable_tiers

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


def valid_rows(probs: torch.Tensor) -> torch.Tensor:
    """(...,) bool: rows of `probs` that are a distribution multinomial can draw from."""
    return torch.isfinite(probs).all(-1) & (probs >= 0).all(-1) & (probs.sum(-1) > 0)


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
        valid = valid_rows(flat)
        if not bool(valid.all()):
            # Non-finite logits (NaN weights, float16 overflow): no distribution to draw from.
            # Do what temperature 0 does with them (argmax; generate has already warned that
            # the weights are not finite) instead of multinomial's RuntimeError traceback.
            safe = torch.where(valid[:, None], flat, torch.ones_like(flat))
            drawn = torch.multinomial(safe, 1, generator=self.generator)[:, 0]
            out = torch.where(valid, drawn, flat.argmax(-1))
            return out.reshape(probs.shape[:-1])
        out = torch.multinomial(flat, 1, generator=self.generator)  # (N, 1)
        return out.reshape(probs.shape[:-1])

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) -> next token ids (...,)."""
        if self.greedy:
            return logits.argmax(-1)
        p = self.probs(logits)
        ok = valid_rows(p)
        if not bool(ok.all()):  # non-finite logits: the token temperature 0 picks (see draw)
            return torch.where(ok, self.draw(p), logits.argmax(-1))
        return self.draw(p)

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=device)


# ---- shared by every decoding entry point -------------------------------------------------------------------------------


def prompt_ids(prompt: Any, device: torch.device, vocab_size: int) -> torch.Tensor:
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


def eos_set(model: MatFormerLM, eos_token_id: int | Sequence[int] | None) -> set[int]:
    """The stop tokens: `eos_token_id` (one or several), else the config's; none when unset."""
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def check_lengths(model: MatFormerLM, prompt_len: int, max_new_tokens: int) -> int:
    """The cache length a call needs (prompt + new tokens), checked against the context."""
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


def sync_device(device: torch.device) -> None:
    """Wait for the device (a CUDA clock reads queued work, not done work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampler_and_eos(model: MatFormerLM, device: torch.device, temperature: float, top_k: int | None,
              top_p: float | None, seed: int | None, eos_token_id: int | Sequence[int] | None,
              ignore_eos: bool) -> tuple[Sampler, set[int]]:
    """The sampler and the stop tokens of one decoding call (every decoding entry point)."""
    return (Sampler(temperature, top_k, top_p, seed, device),
            set() if ignore_eos else eos_set(model, eos_token_id))


def call_setting(model: MatFormerLM, request: WidthRequest) -> Setting | None:
    """The full setting one call runs at: each axis `request` names, the model's current
    setting on the other; None for the empty request (the call runs as the model is set)."""
    return model.resolve(request, current=True) if request else None


def default_draft_tier(model: MatFormerLM, limit: int = 3) -> int:
    """The smallest tier (at most `limit`, the paper's S = tier 3) the model can run."""
    return runnable_tiers(model.base_width, model.stored_widths, limit=limit + 1)[-1]


def emit_token(tok: int, out: list[int], stream: StreamCallback | None, eos: set[int],
               stats: GenerationStats) -> bool:
    """Append `tok` to `out` and stream it; True when it ends the sequence (an EOS token,
    recorded as the stop reason)."""
    out.append(tok)
    if stream is not None:
        stream([tok])
    if tok in eos:
        stats.stop_reason = "eos"
        return True
    return False
