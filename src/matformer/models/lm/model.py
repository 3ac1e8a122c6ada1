"""The MatFormer decoder: a Llama-compatible causal LM whose FFNs are nested.

Architecture (numerically the same as transformers' `LlamaForCausalLM`, parameter names identical
so the Hugging Face key map is the identity):
- token embedding -> N x [RMSNorm -> GQA self-attention with rotary embeddings -> residual,
  RMSNorm -> SwiGLU FFN -> residual] -> RMSNorm -> lm_head (optionally tied to the embedding).
- Nested FFN: layer i stores `gate_proj`/`up_proj` of shape [I_i, H] and `down_proj` of shape
  [H, I_i]. Running at width m uses rows [:m] of gate/up and columns [:, :m] of down. These are
  views of the stored weights: switching width copies nothing, the unused tail receives exactly
  zero gradient, and the matmuls shrink with m (compute is proportional to the width).
- Nested attention heads (the second elastic axis): layer i stores G_i KV heads and r query
  heads per KV head. Running at g KV heads uses rows [:g*r*hd] of q_proj, rows [:g*hd] of
  k_proj/v_proj and columns [:, :g*r*hd] of o_proj: the first g KV groups, again as views (no
  copy, zero gradient on the rest, attention compute and KV cache proportional to g).
- The active setting (FFN widths and KV heads) is a setting of the model (`set_widths`,
  `at_width`), not a forward argument, so a generation loop can't silently drift to another
  width between calls. One call sets both axes; an axis not named goes back to what is stored.
- A KV cache (`KVCache`, preallocated, gpt-fast style) for incremental decoding, per layer at a
  given KV head count (`new_cache` allocates the active heads: memory proportional to g); a
  forward uses the first g heads of it. `crop()` rolls back positions, which speculative decoding
  uses to let the verifier overwrite the draft's entries in the same cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from matformer.errors import TierError
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.numerics import activation, hidden_act
from matformer.models.lm.rope import RopeSpec
from matformer.models.lm.rope import inv_freq as rope_inv_freq
from matformer.models.lm.shapes import parameter_counts
from matformer.models.nesting import WidthSetting


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, as transformers does, then scale in the input dtype.
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary:
    """Rotary embeddings computed exactly as transformers does for the config's rope type
    (`models.lm.rope`: default, linear, dynamic, yarn, llama3): cos/sin for the positions of
    each call, no table sized to max_position_embeddings."""

    def __init__(self, head_dim: int, theta: float | None = None, spec: RopeSpec | None = None,
                 max_positions: int = 2048) -> None:
        self.head_dim = head_dim
        self.spec = spec if spec is not None else RopeSpec(theta=10000.0 if theta is None
                                                           else float(theta))
        self.theta = self.spec.theta
        self.max_positions = max_positions
        self._inv_freq: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        return self._freqs(device)[0]

    def _freqs(self, device: torch.device) -> tuple[torch.Tensor, float]:
        if device not in self._inv_freq:  # computed on the CPU as transformers does, then moved
            inv, factor = rope_inv_freq(self.spec, self.head_dim, self.max_positions)
            self._inv_freq[device] = (inv.to(device), factor)
        return self._inv_freq[device]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) -> cos, sin: (B, T, hd)
        inv, factor = self._freqs(positions.device)
        if self.spec.rope_type == "dynamic":
            longest = int(positions.max()) + 1 if positions.numel() else 0
            if longest > self.max_positions:  # transformers' dynamic_rope_update: grown
                inv, factor = rope_inv_freq(self.spec, self.head_dim, self.max_positions,
                                            seq_len=torch.tensor(longest))
                inv = inv.to(positions.device)
        inv_e = inv[None, :, None].expand(positions.shape[0], -1, 1)
        freqs = (inv_e @ positions[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return cos.to(dtype), sin.to(dtype)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(..., Tq, Tk) booleans: key position k is seen from query position q when k <= q and,
    with a `window`, q - k < window (transformers' sliding_window_overlay: k > q - window)."""
    seen = k_pos[..., None, :] <= q_pos[..., :, None]
    if window is not None:
        seen = seen & (k_pos[..., None, :] > q_pos[..., :, None] - window)
    return seen


class KVCache:
    """Preallocated keys/values for every layer: (B, heads_i, max_len, hd) each, heads_i the KV
    heads allocated for layer i (default: every stored head). A forward at g <= heads_i KV heads
    reads and writes heads [:g].

    `length` is the number of valid positions. A forward with a cache writes its keys at
    [length, length+T) and then advances `length`; `crop(n)` forgets everything from n on.
    """

    def __init__(self, config: MatFormerConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 kv_heads: Sequence[int] | None = None) -> None:
        if max_len > config.max_position_embeddings:
            raise TierError(
                f"KV cache of {max_len} positions exceeds max_position_embeddings="
                f"{config.max_position_embeddings}"
            )
        heads = config.layer_kv_heads if kv_heads is None else list(kv_heads)
        if len(heads) != config.num_hidden_layers:
            raise TierError(f"KV cache: got {len(heads)} per-layer head counts for "
                            f"{config.num_hidden_layers} layers")
        dtype = dtype or config.dtype
        self.k = [torch.zeros((batch_size, g, max_len, config.head_dim), device=device, dtype=dtype)
                  for g in heads]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.kv_heads = heads
        self.max_len = max_len
        self.length = 0

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence takes (keys and values, every layer)."""
        return sum(2 * k.shape[1] * k.shape[3] * k.element_size() for k in self.k)

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    """GQA self-attention whose first `kv_heads` KV groups form the smaller model's attention."""

    def __init__(self, config: MatFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.group = config.group_size  # query heads per KV head (r)
        self.hd = config.head_dim
        stored = config.layer_kv_heads[layer_idx]
        h = config.hidden_size
        qkv_bias = config.qkv_bias
        self.q_proj = nn.Linear(h, stored * self.group * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(h, stored * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(h, stored * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(stored * self.group * self.hd, h, bias=config.o_bias)
        if config.qk_norm:  # Qwen3: one RMSNorm over head_dim, shared by every head
            self.q_norm = RMSNorm(self.hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.window = config.layer_windows[layer_idx]
        """Sliding attention window of this layer (None: full causal attention)."""
        self.kv_heads = stored
        """Active KV heads g (the first g KV groups run)."""

    @property
    def stored_kv_heads(self) -> int:
        return self.k_proj.weight.shape[0] // self.hd

    def _weights(self) -> tuple[torch.Tensor, ...]:
        """q, k, v, o weights of the active heads: the stored tensors or prefix views of them
        (rows of q/k/v are contiguous; columns of o a strided view read with the stored stride)."""
        g = self.kv_heads
        wq, wk, wv, wo = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                          self.o_proj.weight)
        if g == self.stored_kv_heads:
            return wq, wk, wv, wo
        q_rows, kv_rows = g * self.group * self.hd, g * self.hd
        return wq[:q_rows], wk[:kv_rows], wv[:kv_rows], wo[:, :q_rows]

    def _biases(self) -> tuple[torch.Tensor | None, ...]:
        """q, k, v biases of the active heads (prefixes of rows, as the weights), or Nones."""
        bq, bk, bv = self.q_proj.bias, self.k_proj.bias, self.v_proj.bias
        if bq is None or self.kv_heads == self.stored_kv_heads:
            return bq, bk, bv
        q_rows, kv_rows = self.kv_heads * self.group * self.hd, self.kv_heads * self.hd
        return bq[:q_rows], bk[:kv_rows], bv[:kv_rows]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, start: int | torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`start`: the cache position of x's first token; or, for static decoding
        (`MatFormerLM.forward_static`), the cache columns (T,) of x's tokens as a tensor, with
        `mask` (B, 1, T, max_len) saying which cached columns each query sees."""
        B, T, _ = x.shape
        g = self.kv_heads
        nh = g * self.group
        if g == self.stored_kv_heads:  # the modules themselves (an adapter wrapping them runs)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            _check_plain(self, ("q_proj", "k_proj", "v_proj", "o_proj"), "KV heads", g)
            wq, wk, wv, _ = self._weights()
            bq, bk, bv = self._biases()
            q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
        q = q.view(B, T, nh, self.hd)
        k = k.view(B, T, g, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, nh, T, hd)
        k = k.transpose(1, 2)  # (B, g, T, hd)
        v = v.view(B, T, g, self.hd).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        is_causal = T > 1
        if cache is not None:
            # The first g heads of the cache (a view; the whole cache when it holds g).
            ck, cv = self._cache_heads(cache, g)
        if cache is not None and isinstance(start, torch.Tensor):
            # Static shapes for torch.compile: write at the columns `start`, attend over the
            # whole cache; `mask` hides future, padding and stale columns.
            ck.index_copy_(2, start, k)
            cv.index_copy_(2, start, v)
            k, v = ck, cv
            is_causal = False
        elif cache is not None:
            end = start + T
            if end > cache.max_len:
                raise TierError(f"KV cache holds {cache.max_len} positions; this call needs {end}")
            ck[:, :, start:end] = k
            cv[:, :, start:end] = v
            k, v = ck[:, :, :end], cv[:, :, :end]
            if start > 0 and (T > 1 or self._masks(end)):
                # Query i sits at absolute position start+i and sees keys 0..start+i (those
                # within the window, if any).
                mask = window_mask(torch.arange(start, end, device=x.device),
                                   torch.arange(end, device=x.device), self.window)  # (T, end)
                is_causal = False
            elif start > 0:
                is_causal = False
        if mask is None and is_causal and self._masks(T):
            pos = torch.arange(T, device=x.device)
            mask, is_causal = window_mask(pos, pos, self.window), False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.hd**-0.5,
            enable_gqa=self.group != 1,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * self.hd)
        if g == self.stored_kv_heads:
            return self.o_proj(y)
        return F.linear(y, self._weights()[3], self.o_proj.bias)

    def _masks(self, length: int) -> bool:
        """The window hides some key from some query of a sequence of `length` positions."""
        return self.window is not None and length > self.window

    def _cache_heads(self, cache: KVCache, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
        if g > ck.shape[1]:
            raise TierError(f"KV cache holds {ck.shape[1]} KV heads in layer {self.layer_idx}; "
                            f"this model runs {g} (allocate the cache at the heads it will run: "
                            f"new_cache(..., kv_heads=...))")
        return (ck, cv) if g == ck.shape[1] else (ck[:, :g], cv[:, :g])


def _check_plain(owner: nn.Module, names: tuple[str, ...], axis: str, active: int) -> None:
    """A narrower setting reads prefix views of the weights, past any module that wraps a
    projection (a PEFT LoRA adapter): refused, rather than dropping the adapter's term."""
    wrapped = [n for n in names if type(getattr(owner, n)) is not nn.Linear]
    if wrapped:
        raise TierError(f"{wrapped[0]} is wrapped ({type(getattr(owner, wrapped[0])).__name__}, "
                        f"e.g. a LoRA adapter), which runs at the stored size only; this model "
                        f"runs {active} {axis}: merge the adapter first (merge_and_unload) or "
                        f"fine-tune a checkpoint sliced to this width")


class NestedMLP(nn.Module):
    """SwiGLU FFN whose first `width` neurons form the smaller model's FFN."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.act = activation(act)  # config hidden_act (models.lm.numerics)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.width = intermediate_size

    @property
    def stored_width(self) -> int:
        return self.gate_proj.weight.shape[0]

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate, up, down weights of the active width: the stored tensors or views of them
        (rows [:m] of gate/up are contiguous; columns [:, :m] of down a strided view read with
        a leading dimension of the stored width)."""
        m = self.width
        gate, up, down = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if m == self.stored_width:
            return gate, up, down
        return gate[:m], up[:m], down[:, :m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.width
        if m == self.stored_width:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        _check_plain(self, ("gate_proj", "up_proj", "down_proj"), "FFN width", m)
        gate, up, down = self._weights()  # views, not copies
        return F.linear(self.act(F.linear(x, gate)) * F.linear(x, up), down)


class DecoderLayer(nn.Module):
    def __init__(self, config: MatFormerConfig, layer_idx: int, intermediate_size: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = NestedMLP(config.hidden_size, intermediate_size, hidden_act(config))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache, start, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: MatFormerConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, w) for i, w in enumerate(config.layer_widths)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MatFormerLM(WidthSetting, nn.Module):
    """Causal LM with nested FFNs. `forward(input_ids) -> logits (B, T, V)`."""

    def __init__(self, config: MatFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(config.head_dim, spec=config.rope,
                             max_positions=config.max_position_embeddings)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ---- init ------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """transformers' Llama init: N(0, initializer_range) for linears and embeddings."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                if mod is self.lm_head and self.config.tie_word_embeddings:
                    continue
                w = torch.empty(mod.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                mod.weight.copy_(w)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)

    # ---- widths (set_widths, at_width, resolve_*: WidthSetting) ---------------------------

    def _width_slots(self) -> list[tuple[NestedMLP, Attention]]:
        return [(layer.mlp, layer.self_attn) for layer in self.model.layers]

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                start: int | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). With a cache, positions continue from
        `cache.length` (or `start`), keys/values are written into it, and its length advances."""
        B, T = input_ids.shape
        if start is None:
            start = cache.length if cache is not None else 0
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, start)
        if cache is not None:
            cache.length = start + T
        return self.lm_head(self.model.norm(x))

    def forward_static(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache,
                       pad: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """The decode step with static shapes (what `matformer.inference.static_cache` compiles, gpt-fast
        style): input_ids (B, T) go to cache columns `input_pos` (T,), every row's prompt is
        left-padded by `pad` (B,) columns, and attention runs over all `cache.max_len` columns
        under a mask, so neither the position nor the cache length changes a shape. Row b's
        token in column c has rotary position c - pad[b]. Returns logits (B, T, V), or
        (B, 1, V) for the last token only. `cache.length` is left to the caller."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        positions = (input_pos[None, :] - pad[:, None]).clamp_min(0)  # (B, T)
        cos, sin = self.rotary(positions, x.dtype)
        cols = torch.arange(cache.max_len, device=input_ids.device)  # (L,)
        q_col = input_pos[None, :, None]  # (1, T, 1)
        # Column c is seen by the query in column q when c <= q and c is no padding; a padding
        # query sees itself (a row of -inf would give NaN keys for later layers to read).
        mask = (cols <= q_col) & ((cols >= pad[:, None, None]) | (cols == q_col))  # (B, T, L)
        masks = {None: mask[:, None]}  # (B, 1, T, L)
        for w in set(self.config.layer_windows) - {None}:
            # A window counts columns as positions: both are offset by the row's padding.
            masks[w] = (mask & ((cols > q_col - w) | (cols == q_col)))[:, None]
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, input_pos, masks[layer.self_attn.window])
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (natural log). `labels` default to `input_ids`; label
        -100 is ignored; the shift is done here, as transformers does."""
        logits = self(input_ids)
        return lm_loss(logits, input_ids if labels is None else labels)

    def new_cache(self, batch_size: int, max_len: int,
                  kv_heads: Sequence[int] | None = None) -> KVCache:
        """A KV cache for `batch_size` sequences of up to `max_len` positions, holding per layer
        `kv_heads` heads (default: the active heads, so memory is proportional to them)."""
        p = self.model.embed_tokens.weight
        heads = self.layer_kv_heads if kv_heads is None else list(kv_heads)
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype,
                       kv_heads=heads)

    # ---- sizes -----------------------------------------------------------------------------

    def num_parameters_at(self, widths: Sequence[int] | None = None,
                          kv_heads: Sequence[int] | None = None) -> dict[str, int]:
        """Parameter counts (see `matformer.models.lm.shapes.parameter_counts`) at `widths` and per-layer
        `kv_heads`, default the active setting."""
        return parameter_counts(self.config, self.widths if widths is None else list(widths),
                                self.layer_kv_heads if kv_heads is None else list(kv_heads))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross-entropy: logits (B, T, V) at position t predict labels[:, t+1].

    The labels are shifted (and padded with the ignore index) rather than the logits sliced, so
    the (B, T, V) logits are never copied."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
    logits = logits if logits.dtype == torch.float32 else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=-100)

