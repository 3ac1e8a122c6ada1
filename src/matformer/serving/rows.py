"""One decoding step for rows that each own a KV cache.

Continuous batching lets a request join or leave between any two steps, so no two rows share a
cache: each holds a `KVCache` of one sequence, allocated at its own KV heads and sized to its
prompt plus its `max_tokens`. A step over B rows of one width setting runs what every row has in
common as one batched matmul (the q/k/v/o projections, the norms, the FFN, the head: nearly all
of the FLOPs of a small model) and the attention per row, over that row's own cache.

For one row this is, op for op, what `MatFormerLM.forward` does for a one-token step with a cache
(the same weight views, rotary arithmetic and `scaled_dot_product_attention` call), so a request
served alone decodes exactly what `matformer generate` decodes at its width. Batched with other
rows only the matmuls' row count changes (the same result up to float summation order).

A prompt (or a chunk of one) is run by the model's own `forward` with the row's cache, one row
at a time (`prefill`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from matformer.models.lm.model import KVCache, MatFormerLM
from matformer.tiers import Setting


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary embedding's half rotation, as the model computes it."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def ffn_residual(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x + FFN(norm(x)): the second half of a decoder layer (what `--compile` compiles)."""
    return x + layer.mlp(layer.post_attention_layernorm(x))


class RowStepper:
    """Runs steps and prefills for rows of any width on one model (the engine's only caller
    of the model: it sets the model's width before each group of rows)."""

    def __init__(self, model: MatFormerLM, *, compile: bool = False) -> None:
        self.model = model
        self.device = model.model.embed_tokens.weight.device
        self.ffn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = ffn_residual
        if compile:
            # Dynamic shapes: one graph for every batch size; one per FFN width (an int on the
            # module, guarded on).
            self.ffn = torch.compile(ffn_residual, dynamic=True)

    def new_cache(self, setting: Setting, max_len: int) -> KVCache:
        """A cache for one sequence of up to `max_len` positions at the heads of `setting`."""
        return self.model.new_cache(1, max_len, kv_heads=setting.kv_heads)

    def prefill(self, setting: Setting, cache: KVCache, ids: Sequence[int]) -> torch.Tensor:
        """Run the tokens `ids` of one row after what its cache holds; the last logits (V,)."""
        with torch.inference_mode():
            self.model.apply(setting)
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            return self.model(x, cache=cache)[0, -1]

    def step(self, setting: Setting, caches: Sequence[KVCache],
             tokens: Sequence[int]) -> torch.Tensor:
        """One token per row (`tokens[b]` after what `caches[b]` holds) -> logits (B, V)."""
        model = self.model
        with torch.inference_mode():
            model.apply(setting)
            B = len(caches)
            ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
            pos = torch.tensor([[c.length] for c in caches], dtype=torch.long, device=self.device)
            x = model.model.embed_tokens(ids)  # (B, 1, H)
            cos, sin = model.rotary(pos, x.dtype)
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
                ys = []
                for b, cache in enumerate(caches):
                    ck, cv = cache.k[i], cache.v[i]
                    if g != ck.shape[1]:
                        ck, cv = ck[:, :g], cv[:, :g]
                    p = cache.length
                    ck[:, :, p:p + 1] = k[b:b + 1]
                    cv[:, :, p:p + 1] = v[b:b + 1]
                    ys.append(F.scaled_dot_product_attention(
                        q[b:b + 1], ck[:, :, :p + 1], cv[:, :, :p + 1], is_causal=False,
                        scale=hd**-0.5, enable_gqa=r != 1))
                y = ys[0] if B == 1 else torch.cat(ys)  # (B, nh, 1, hd)
                x = x + F.linear(y.transpose(1, 2).reshape(B, 1, nh * hd), wo)
                x = self.ffn(layer, x)
            for cache in caches:
                cache.length += 1
            return model.lm_head(model.model.norm(x))[:, -1]
