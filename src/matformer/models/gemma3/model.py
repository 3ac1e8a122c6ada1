"""The nested Gemma 3 text decoder: numerically transformers 5.25's `Gemma3ForCausalLM`, with
its parameter names (the Hugging Face key map is the identity).

What differs from the Llama block (`models.lm.model`), each as modeling_gemma3.py computes it:
- the embedding is multiplied by sqrt(hidden_size) cast to the embedding's dtype (bfloat16
  rounds sqrt(3072) to 55.5, and transformers does the same);
- RMSNorm scales by (1 + weight), in float32, and casts after the scale;
- four norms per layer: input and post-attention around the attention, pre- and post-feedforward
  around the FFN (each branch is normed before the residual add);
- per-head q_norm/k_norm on queries and keys before rope;
- the FFN is GeGLU (`hidden_activation`, gelu_pytorch_tanh) in the nested SwiGLU module;
- attention scores scaled by query_pre_attn_scalar ** -0.5;
- `layer_types`: sliding layers see the keys q - sliding_window < k <= q, rotary base
  rope_local_base_freq; global layers see every earlier key, base rope_theta (positions divided
  by the linear rope factor when the config scales them);
- optional final-logit soft-capping (cap * tanh(logits / cap)).

Nesting, the width setting, the KV cache and static decoding work as in `models.lm.model`
(`WidthSetting`; `KVCache` preallocated for the run's length, never max_position_embeddings;
`forward_static` for the compiled decoder). The sliding window is a mask over the cache: the
cache keeps every position (the sliding layers' memory is not reduced).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from matformer.errors import TierError
from matformer.models.gemma3.config import Gemma3Config
from matformer.models.gemma3.shapes import parameter_counts
from matformer.models.lm.model import KVCache, MatFormerLM, NestedMLP, lm_loss
from matformer.models.nesting import WidthSetting


class Gemma3RMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in float32, cast back after the scale (zero weight: identity)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary:
    """Rotary embeddings of one layer type: base `theta`, positions divided by `factor` (linear
    scaling: transformers divides the inverse frequencies by it)."""

    def __init__(self, head_dim: int, theta: float, factor: float = 1.0) -> None:
        self.head_dim, self.theta, self.factor = head_dim, theta, factor
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exps = torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim
            inv = 1.0 / (self.theta ** exps)
            if self.factor != 1.0:
                inv = inv / self.factor
            self._inv_freq[device] = inv.to(device)
        return self._inv_freq[device]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq(positions.device)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Gemma3Attention(nn.Module):
    """GQA self-attention with q/k norms; the first `kv_heads` KV groups run."""

    def __init__(self, config: Gemma3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.group = config.group_size
        self.hd = hd = config.head_dim
        assert hd is not None
        self.sliding = config.is_sliding(layer_idx)
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        stored = config.layer_kv_heads[layer_idx]
        h = config.hidden_size
        self.q_proj = nn.Linear(h, stored * self.group * hd, bias=False)
        self.k_proj = nn.Linear(h, stored * hd, bias=False)
        self.v_proj = nn.Linear(h, stored * hd, bias=False)
        self.o_proj = nn.Linear(stored * self.group * hd, h, bias=False)
        self.q_norm = Gemma3RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(hd, config.rms_norm_eps)
        self.kv_heads = stored
        """Active KV heads g (the first g KV groups run)."""

    @property
    def stored_kv_heads(self) -> int:
        return self.k_proj.weight.shape[0] // self.hd

    def _weights(self) -> tuple[torch.Tensor, ...]:
        g = self.kv_heads
        wq, wk, wv, wo = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                          self.o_proj.weight)
        if g == self.stored_kv_heads:
            return wq, wk, wv, wo
        q_rows, kv_rows = g * self.group * self.hd, g * self.hd
        return wq[:q_rows], wk[:kv_rows], wv[:kv_rows], wo[:, :q_rows]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, start: int | torch.Tensor,
                mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """`mask`: which keys each query sees (None with `causal`: the plain causal mask, None
        without it: every key); `start` the cache position of x's first token, or for static
        decoding the cache columns (T,) of x's tokens."""
        B, T, _ = x.shape
        g = self.kv_heads
        nh = g * self.group
        wq, wk, wv, wo = self._weights()
        q = self.q_norm(F.linear(x, wq).view(B, T, nh, self.hd).transpose(1, 2))
        k = self.k_norm(F.linear(x, wk).view(B, T, g, self.hd).transpose(1, 2))
        v = F.linear(x, wv).view(B, T, g, self.hd).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        if cache is not None:
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
            if g > ck.shape[1]:
                raise TierError(f"KV cache holds {ck.shape[1]} KV heads in layer "
                                f"{self.layer_idx}; this model runs {g} (allocate the cache at "
                                f"the heads it will run: new_cache(..., kv_heads=...))")
            if g != ck.shape[1]:
                ck, cv = ck[:, :g], cv[:, :g]
            if isinstance(start, torch.Tensor):
                ck.index_copy_(2, start, k)
                cv.index_copy_(2, start, v)
                k, v = ck, cv
            else:
                end = start + T
                if end > cache.max_len:
                    raise TierError(f"KV cache holds {cache.max_len} positions; this call needs "
                                    f"{end}")
                ck[:, :, start:end] = k
                cv[:, :, start:end] = v
                k, v = ck[:, :, :end], cv[:, :, :end]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=self.scale, enable_gqa=self.group != 1)
        return F.linear(y.transpose(1, 2).reshape(B, T, nh * self.hd), wo)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3Config, layer_idx: int, intermediate_size: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer_idx)
        self.mlp = NestedMLP(h, intermediate_size, config.hidden_activation)
        self.input_layernorm = Gemma3RMSNorm(h, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(h, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(h, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(h, eps)

    def forward(self, x, cos, sin, cache, start, mask=None, causal=False):
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask, causal)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Decoder(nn.Module):
    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, w) for i, w in enumerate(config.layer_widths))
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3LM(WidthSetting, nn.Module):
    """Nested Gemma 3 causal LM. `forward(input_ids) -> logits (B, T, V)`; the interface of
    `models.lm.model.MatFormerLM` (cache, static decoding, loss, widths), so every stage runs it."""

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        hd = config.head_dim
        assert hd is not None
        self.rotary = Rotary(hd, config.rope_theta, config.rope_scaling_factor)
        self.local_rotary = Rotary(hd, config.rope_local_base_freq)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """transformers' Gemma 3 init: N(0, initializer_range) for linears and the embedding,
        zeros for the (1 + w) norms."""
        gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                if mod is self.lm_head and self.config.tie_word_embeddings:
                    continue
                w = torch.empty(mod.weight.shape, dtype=torch.float32).normal_(0.0, std,
                                                                               generator=gen)
                mod.weight.copy_(w)
            elif isinstance(mod, Gemma3RMSNorm):
                mod.weight.zero_()

    def _width_slots(self) -> list[tuple[NestedMLP, Gemma3Attention]]:
        return [(layer.mlp, layer.self_attn) for layer in self.model.layers]

    # ---- forward ---------------------------------------------------------------------------

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight
        scale = torch.tensor(self.config.hidden_size ** 0.5, dtype=w.dtype, device=w.device)
        return self.model.embed_tokens(input_ids) * scale

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(x))
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _masks(self, q_start: int, T: int, k_start: int, device: torch.device
               ) -> dict[bool, tuple[torch.Tensor | None, bool]]:
        """{sliding: (mask, causal)} for queries at positions q_start..q_start+T-1 over keys at
        positions k_start..q_start+T-1: no mask where sdpa's own causal flag (or, for one query,
        no mask at all) already hides exactly the right keys."""
        last = q_start + T - 1
        out: dict[bool, tuple[torch.Tensor | None, bool]] = {}
        for sliding in (False, True):
            window = self.config.sliding_window if sliding else None
            hides = window is not None and k_start <= last - window  # some key out of window
            if not hides and T == 1:
                out[sliding] = (None, False)
            elif not hides and k_start == q_start:
                out[sliding] = (None, True)
            else:
                q_pos = torch.arange(q_start, last + 1, device=device)[:, None]
                k_pos = torch.arange(k_start, last + 1, device=device)[None, :]
                mask = k_pos <= q_pos
                if window is not None:
                    mask = mask & (k_pos > q_pos - window)
                out[sliding] = (mask, False)
        return out

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                start: int | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). With a cache, positions continue from
        `cache.length` (or `start`), keys/values are written into it, and its length advances."""
        B, T = input_ids.shape
        if start is None:
            start = cache.length if cache is not None else 0
        x = self._embed(input_ids)
        positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        rope = {False: self.rotary(positions, x.dtype), True: self.local_rotary(positions, x.dtype)}
        # With a cache the keys are every position up to the last query; without one, this
        # call's tokens only.
        masks = self._masks(start, T, 0 if cache is not None else start, input_ids.device)
        for layer in self.model.layers:
            sliding = layer.self_attn.sliding
            mask, causal = masks[sliding]
            x = layer(x, *rope[sliding], cache, start, mask, causal)
        if cache is not None:
            cache.length = start + T
        return self._logits(x)

    def forward_static(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache,
                       pad: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """The static-shape decode step (`models.lm.model.MatFormerLM.forward_static`): tokens
        to cache columns `input_pos`, rows left-padded by `pad`; sliding layers also hide the
        columns a window or more behind the query."""
        B, T = input_ids.shape
        x = self._embed(input_ids)
        positions = (input_pos[None, :] - pad[:, None]).clamp_min(0)
        rope = {False: self.rotary(positions, x.dtype), True: self.local_rotary(positions, x.dtype)}
        cols = torch.arange(cache.max_len, device=input_ids.device)
        q_col = input_pos[None, :, None]
        full = (cols <= q_col) & ((cols >= pad[:, None, None]) | (cols == q_col))
        masks = {False: full[:, None]}
        window = self.config.sliding_window
        if window is not None:
            masks[True] = (full & (cols > q_col - window))[:, None]
        for layer in self.model.layers:
            sliding = layer.self_attn.sliding
            x = layer(x, *rope[sliding], cache, input_pos, masks[sliding], False)
        if last_only:
            x = x[:, -1:]
        return self._logits(x)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (natural log), labels shifted here (-100 ignored)."""
        return lm_loss(self(input_ids), input_ids if labels is None else labels)

    # The Llama layout's cache as it is: per layer the active KV heads, for the run's length.
    new_cache = MatFormerLM.new_cache

    def num_parameters_at(self, widths: Sequence[int] | None = None,
                          kv_heads: Sequence[int] | None = None) -> dict[str, int]:
        """Parameter counts (`models.gemma3.shapes.parameter_counts`) at `widths` and per-layer
        `kv_heads`, default the active setting."""
        return parameter_counts(self.config, self.widths if widths is None else list(widths),
                                self.layer_kv_heads if kv_heads is None else list(kv_heads))
