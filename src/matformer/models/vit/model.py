"""MatViT: a ViT image classifier whose FFN neurons and attention heads are nested.

Architecture (numerically the same as transformers' `ViTForImageClassification`, parameter names
identical to the ones its `save_pretrained` writes, so the Hugging Face key map is the identity):
- pixel_values (B, C, H, W) -> non-overlapping P x P patches projected by a conv
  (`patch_embeddings.projection`) -> [CLS] token prepended -> learned position embeddings added
  -> N x [LayerNorm -> multi-head self-attention -> residual, LayerNorm -> GELU FFN -> residual]
  -> final LayerNorm -> the [CLS] row is the embedding -> linear classifier -> logits (B, labels).
  Pre-norm, exact (erf) GELU, LayerNorm eps 1e-12 by default, biases everywhere, no pooler.
- Nested FFN, exactly as in the language model: layer i stores `intermediate.dense` [I_i, H] and
  `output.dense` [H, I_i]; width m uses rows [:m] (and bias [:m]) of the first and columns [:, :m]
  of the second. The output bias is added at every width.
- Nested heads (the heads contract of docs/FORMAT.md with one query head per KV head): g heads
  use rows [:g*hd] of query/key/value (weights and biases) and columns [:, :g*hd] of the
  attention's `output.dense`. `head_dim` never changes.
- Both are views of the stored weights: switching width copies nothing, the unused tail gets
  exactly zero gradient, and compute shrinks with the width. The active widths and heads are a
  setting of the model (`set_widths`, `at_width`), not forward arguments.
- The last block computes only the [CLS] row after its keys and values (the only row the head
  reads; everything after attention is row-wise, so logits are unchanged): about 1/N of the
  blocks' compute saved.
- Dropout is not implemented (ViT's configs default it to 0; a rate in config.json is kept but
  not applied).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from matformer.errors import DataError
from matformer.models.nesting import WidthSetting
from matformer.models.vit.config import MatViTConfig, parameter_counts


def _activation(name: str):
    # transformers' "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" the tanh one.
    approximate = "none" if name == "gelu" else "tanh"
    return lambda x: F.gelu(x, approximate=approximate)


class PatchEmbeddings(nn.Module):
    def __init__(self, config: MatViTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, N, H)


class Embeddings(nn.Module):
    def __init__(self, config: MatViTConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.patch_embeddings = PatchEmbeddings(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(pixel_values)  # (B, N, H)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, H)
        return torch.cat((cls, x), dim=1) + self.position_embeddings  # (B, N+1, H)


class SelfAttention(nn.Module):
    """The query/key/value projections (transformers' `attention.attention`)."""

    def __init__(self, config: MatViTConfig, heads: int) -> None:
        super().__init__()
        h, hd, bias = config.hidden_size, config.head_dim, config.qkv_bias
        assert hd is not None
        self.query = nn.Linear(h, heads * hd, bias=bias)
        self.key = nn.Linear(h, heads * hd, bias=bias)
        self.value = nn.Linear(h, heads * hd, bias=bias)


class SelfOutput(nn.Module):
    def __init__(self, config: MatViTConfig, heads: int) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.dense = nn.Linear(heads * config.head_dim, config.hidden_size)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens, running the first `heads` heads."""

    def __init__(self, config: MatViTConfig, heads: int) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.attention = SelfAttention(config, heads)
        self.output = SelfOutput(config, heads)
        self.hd = config.head_dim
        self.kv_heads = heads
        """Active heads g (the first g run; ViT attention is multi-head: its KV heads are its heads)."""

    @property
    def stored_kv_heads(self) -> int:
        return self.attention.query.weight.shape[0] // self.hd

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """x (B, T, H) -> (B, Q, H): every token attends to all T; `queries` keeps only the
        first Q query rows (the [CLS] row in the last block), keys and values stay all T."""
        B, T, _ = x.shape
        g = self.kv_heads
        n = g * self.hd
        full = g == self.stored_kv_heads
        qkv = []
        for proj, inp in zip((self.attention.query, self.attention.key, self.attention.value),
                             (x if queries is None else x[:, :queries], x, x), strict=True):
            # Rows [:n] of a [G*hd, H] weight: a contiguous view, no copy.
            w, b = (proj.weight, proj.bias) if full else (proj.weight[:n], _head(proj.bias, n))
            qkv.append(F.linear(inp, w, b).view(B, inp.shape[1], g, self.hd).transpose(1, 2))
        y = F.scaled_dot_product_attention(*qkv, scale=self.hd**-0.5)  # (B, g, Q, hd)
        y = y.transpose(1, 2).reshape(B, -1, n)
        w_out = self.output.dense.weight if full else self.output.dense.weight[:, :n]
        return F.linear(y, w_out, self.output.dense.bias)


def _head(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if bias is None else bias[:n]


class Intermediate(nn.Module):
    def __init__(self, config: MatViTConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, width)


class Output(nn.Module):
    def __init__(self, config: MatViTConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, config.hidden_size)


class Layer(nn.Module):
    """One pre-norm block; `width` is the active FFN width (the first `width` neurons)."""

    def __init__(self, config: MatViTConfig, width: int, heads: int) -> None:
        super().__init__()
        self.attention = Attention(config, heads)
        self.intermediate = Intermediate(config, width)
        self.output = Output(config, width)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = _activation(config.hidden_act)
        self.width = width

    @property
    def stored_width(self) -> int:
        return self.intermediate.dense.weight.shape[0]

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        m = self.width
        up, down = self.intermediate.dense, self.output.dense
        if m == self.stored_width:
            return down(self.act(up(x)))
        # Views, not copies: rows [:m] are contiguous; columns [:, :m] are a strided view that
        # the matmul reads with a leading dimension of the stored width.
        h = self.act(F.linear(x, up.weight[:m], up.bias[:m]))  # (B, T, m)
        return F.linear(h, down.weight[:, :m], down.bias)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """(B, T, H) -> (B, T, H), or (B, Q, H): the first `queries` rows only."""
        h = self.attention(self.layernorm_before(x), queries)
        x = (x if queries is None else x[:, :queries]) + h
        return x + self.ffn(self.layernorm_after(x))


class Encoder(nn.Module):
    def __init__(self, config: MatViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            Layer(config, w, g) for w, g in zip(config.layer_widths, config.layer_kv_heads, strict=True)
        )


class ViTBackbone(nn.Module):
    def __init__(self, config: MatViTConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class MatViT(WidthSetting, nn.Module):
    """ViT classifier with nested FFNs and heads. `forward(pixel_values) -> logits (B, labels)`."""

    def __init__(self, config: MatViTConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViTBackbone(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels or 0)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ---- init ------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """ViT init: truncated N(0, initializer_range) for projections, the class token and the
        positions; zero biases; LayerNorms at identity."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range

        def trunc_normal_(p: torch.Tensor) -> None:
            w = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            p.copy_(w.clamp_(-2 * std, 2 * std))

        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                trunc_normal_(mod.weight)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        trunc_normal_(self.vit.embeddings.cls_token)
        trunc_normal_(self.vit.embeddings.position_embeddings)

    # ---- widths and heads (set_widths, at_width, resolve_*: WidthSetting) -------------------

    @property
    def layers(self) -> nn.ModuleList:
        return self.vit.encoder.layer

    def _width_slots(self) -> list[tuple[Layer, Attention]]:
        return [(layer, layer.attention) for layer in self.layers]

    # ---- forward ---------------------------------------------------------------------------

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> the final-norm [CLS] embedding (B, hidden), the vector
        the classifier reads and retrieval compares."""
        c, s = self.config.num_channels, self.config.image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (c, s, s):
            raise DataError(f"pixel_values must be (batch, {c}, {s}, {s}); got {tuple(pixel_values.shape)}")
        x = self.vit.embeddings(pixel_values.to(self.classifier.weight.dtype))  # (B, N+1, H)
        for layer in self.layers[:-1]:
            x = layer(x)
        # Only the [CLS] row is read from the last block: its other rows are never computed
        # (every op past the last keys/values is row-wise, so this is exact).
        x = self.layers[-1](x, queries=1)  # (B, 1, H)
        return self.vit.layernorm(x[:, 0])  # (B, H)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> logits (B, num_labels)."""
        return self.classifier(self.embed(pixel_values))

    def loss(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the class logits (natural log), as transformers computes it."""
        return F.cross_entropy(self(pixel_values).float(), labels)

    # ---- sizes -----------------------------------------------------------------------------

    def num_parameters_at(self, widths: Sequence[int] | None = None,
                          kv_heads: Sequence[int] | None = None) -> dict[str, int]:
        return parameter_counts(self.config, list(self.widths if widths is None else widths),
                                list(self.layer_kv_heads if kv_heads is None else kv_heads))
