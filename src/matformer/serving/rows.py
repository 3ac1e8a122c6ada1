"""One decoding step for rows that each own a place in one shared KV pool.

Continuous batching lets a request join or leave between any two steps, so each row has its own
length and position. Every row's keys and values live in one pool per layer, (slots, stored KV
heads, capacity, head_dim), a row owning one slot: a `SlotCache` (a `KVCache` whose tensors are
views of its slot, at the row's own KV heads) that the model's own `forward` fills at prefill.
A step over B rows of one width setting is one batched forward: the projections, norms, FFN and
head as batched matmuls, the new keys written into every row's slot at its own column by one
indexed write, and the attention as one `scaled_dot_product_attention` over the rows' slots (a
view when they are consecutive, else one gather) with a mask that hides each row's columns past
its own length. No per-row Python work and no per-row kernel is left in a step.

For one row the step is, op for op, what `MatFormerLM.forward` does for a one-token step with a
cache (the same weight views, rotary arithmetic and unmasked attention call over the row's
filled columns), so a request served alone decodes exactly what `matformer generate` decodes at
its width (tested bit for bit). Batched with other rows only the matmuls' row count and the
masked (zero-weight) columns change: the same result up to float summation order.

Models whose attention this step does not reproduce (q/k norms, biases, a sliding window, an
adapter wrapping a projection) are stepped by the model's own `forward`, one row at a time, on
the same slot caches: slower, never different.

A prompt (or a chunk of one) is run by the model's own `forward` on the row's slot cache, one
row at a time (`prefill`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from matformer.inference.half_on_cpu import half_on_cpu
from matformer.models.lm.model import KVCache, MatFormerLM
from matformer.tiers import Setting


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary embedding's half rotation, as the model computes it."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def ffn_residual(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x + FFN(norm(x)): the second half of a decoder layer (what `--compile` compiles)."""
    return x + layer.mlp(layer.post_attention_layernorm(x))


class KVPool:
    """Keys and values of every row, one slot per row: per layer (slots, stored KV heads,
    capacity, head_dim). Grows (slots and capacity, by doubling) when a row needs more; a grown
    pool copies what the rows hold and bumps `generation`, so slot views are rebuilt."""

    def __init__(self, model: MatFormerLM) -> None:
        self.model = model
        cfg = model.config
        p = model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.heads = [layer.self_attn.stored_kv_heads for layer in model.model.layers]
        self.hd = cfg.head_dim
        self.context = cfg.max_position_embeddings
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.slots = 0
        self.capacity = 0
        self.free: list[int] = []
        self.generation = 0

    def _grow(self, slots: int, capacity: int) -> None:
        with torch.inference_mode():
            new_k = [torch.zeros(slots, g, capacity, self.hd, device=self.device,
                                 dtype=self.dtype) for g in self.heads]
            new_v = [torch.zeros_like(k) for k in new_k]
            for old, new in ((self.k, new_k), (self.v, new_v)):
                for o, n in zip(old, new, strict=False):
                    n[:self.slots, :, :self.capacity] = o
        self.free.extend(range(self.slots, slots))
        self.free.sort(reverse=True)  # pop() gives the lowest: a full batch's slots stay 0..B-1
        self.k, self.v, self.slots, self.capacity = new_k, new_v, slots, capacity
        self.generation += 1

    def acquire(self, max_len: int) -> int:
        """A free slot for a row of up to `max_len` positions."""
        if max_len > self.context:
            raise ValueError(f"KV cache of {max_len} positions exceeds "
                             f"max_position_embeddings={self.context}")
        slots = self.slots if self.free else max(1, 2 * self.slots)
        capacity = self.capacity if max_len <= self.capacity else min(
            self.context, max(max_len, 2 * self.capacity))
        if (slots, capacity) != (self.slots, self.capacity):
            self._grow(slots, capacity)
        return self.free.pop()

    def release(self, slot: int) -> None:
        if slot not in self.free:
            self.free.append(slot)
            self.free.sort(reverse=True)


class SlotCache(KVCache):
    """One row's cache: its slot of the pool, at its KV heads (views, rebuilt after growth).
    The model's `forward` reads and writes it as any `KVCache`."""

    def __init__(self, pool: KVPool, slot: int, kv_heads: Sequence[int], max_len: int) -> None:
        self.pool = pool
        self.slot = slot
        self.kv_heads = list(kv_heads)
        self.max_len = max_len
        self.length = 0
        self._views: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None

    def _current(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._views is None or self._views[0] != self.pool.generation:
            s = self.slot
            k = [t[s:s + 1, :g] for t, g in zip(self.pool.k, self.kv_heads, strict=True)]
            v = [t[s:s + 1, :g] for t, g in zip(self.pool.v, self.kv_heads, strict=True)]
            self._views = (self.pool.generation, k, v)
        return self._views[1], self._views[2]

    @property  # type: ignore[override]
    def k(self) -> list[torch.Tensor]:
        return self._current()[0]

    @property  # type: ignore[override]
    def v(self) -> list[torch.Tensor]:
        return self._current()[1]


def _plain(model: MatFormerLM) -> bool:
    """The batched step reproduces this model's attention (no q/k norm, biases, window or
    adapter)."""
    for layer in model.model.layers:
        a = layer.self_attn
        projs = (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
        if a.qk_norm or a.window is not None or any(
                type(p) is not torch.nn.Linear or p.bias is not None for p in projs):
            return False
    return True


class RowStepper:
    """Runs steps and prefills for rows of any width on one model (the engine's only caller
    of the model: it sets the model's width before each group of rows)."""

    def __init__(self, model: MatFormerLM, *, compile: bool = False) -> None:
        self.model = model
        self.device = model.model.embed_tokens.weight.device
        self.pool = KVPool(model)
        self.batched = _plain(model)
        self.ffn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = ffn_residual
        if compile:
            # Dynamic shapes: one graph for every batch size; one per FFN width (an int on the
            # module, guarded on).
            self.ffn = torch.compile(ffn_residual, dynamic=True)

    def new_cache(self, setting: Setting, max_len: int) -> SlotCache:
        """A cache for one sequence of up to `max_len` positions at the heads of `setting` (a
        slot of the pool; `release` it when the row leaves)."""
        return SlotCache(self.pool, self.pool.acquire(max_len), setting.kv_heads, max_len)

    def release(self, cache: SlotCache) -> None:
        """Give the row's slot back (its row left the batch)."""
        self.pool.release(cache.slot)

    def prefill(self, setting: Setting, cache: KVCache, ids: Sequence[int]) -> torch.Tensor:
        """Run the tokens `ids` of one row after what its cache holds; the last logits (V,)."""
        with torch.inference_mode():
            self.model.apply(setting)
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            with half_on_cpu(self.model):
                return self.model(x, cache=cache)[0, -1]

    def forward_all(self, setting: Setting, cache: KVCache, ids: Sequence[int]) -> torch.Tensor:
        """Run the tokens `ids` of one row after what its cache holds -> the logits at every
        one of them (T, V): a speculative round's verify (one forward of k+1 tokens)."""
        with torch.inference_mode():
            self.model.apply(setting)
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            return self.model(x, cache=cache)[0]

    def step(self, setting: Setting, caches: Sequence[SlotCache],
             tokens: Sequence[int]) -> torch.Tensor:
        """One token per row (`tokens[b]` after what `caches[b]` holds) -> logits (B, V)."""
        if not self.batched:
            return torch.stack([self.prefill(setting, c, [t])
                                for c, t in zip(caches, tokens, strict=True)])
        model = self.model
        pool = self.pool
        with torch.inference_mode():
            model.apply(setting)
            B = len(caches)
            lengths = [c.length for c in caches]
            slots = [c.slot for c in caches]
            m = max(lengths) + 1  # the columns any row attends over
            dev = self.device
            ids = torch.tensor(tokens, dtype=torch.long, device=dev).view(B, 1)
            pos = torch.tensor(lengths, dtype=torch.long, device=dev)  # (B,) the new columns
            s0 = slots[0]
            run = slots == list(range(s0, s0 + B))  # consecutive slots: a view, no gather
            idx = None if run else torch.tensor(slots, dtype=torch.long, device=dev)
            rows = torch.arange(s0, s0 + B, device=dev) if run else idx
            mask = None
            if min(lengths) + 1 != m:  # rows of different lengths: hide each row's tail
                mask = (torch.arange(m, device=dev) <= pos[:, None]).view(B, 1, 1, m)
            x = model.model.embed_tokens(ids)  # (B, 1, H)
            cos, sin = model.rotary(pos.view(B, 1), x.dtype)
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            for i, layer in enumerate(model.model.layers):
                attn = layer.self_attn
                g, r, hd = setting.kv_heads[i], attn.group, attn.hd
                nh = g * r
                wq, wk, wv, wo = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                  attn.o_proj.weight)
                if g != attn.stored_kv_heads:  # the first g KV groups, as views (as the model)
                    wq, wk, wv, wo = wq[:nh * hd], wk[:g * hd], wv[:g * hd], wo[:, :nh * hd]
                h = layer.input_layernorm(x)
                q = F.linear(h, wq).view(B, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
                k = F.linear(h, wk).view(B, 1, g, hd).transpose(1, 2)  # (B, g, 1, hd)
                v = F.linear(h, wv).view(B, 1, g, hd).transpose(1, 2)
                q = q * c + rotate_half(q) * s
                k = k * c + rotate_half(k) * s
                pk, pv = pool.k[i], pool.v[i]
                pk[rows, :g, pos] = k[:, :, 0]  # every row's key at its own column
                pv[rows, :g, pos] = v[:, :, 0]
                if run:
                    ck, cv = pk[s0:s0 + B, :g, :m], pv[s0:s0 + B, :g, :m]
                else:
                    ck, cv = pk[idx, :g, :m], pv[idx, :g, :m]
                y = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask, is_causal=False,
                                                   scale=hd**-0.5, enable_gqa=r != 1)
                x = x + F.linear(y.transpose(1, 2).reshape(B, 1, nh * hd), wo)
                x = self.ffn(layer, x)
            for cache in caches:
                cache.length += 1
            return model.lm_head(model.model.norm(x))[:, -1]
