"""`MatFormerConfig`: the model config, which *is* the checkpoint's `config.json`.

A uniform-width config is a valid transformers Llama config (`model_type: llama`), plus the two
MatFormer keys (see docs/FORMAT.md, rules from the checkpoint spec §2):

- `intermediate_size`: the FFN width actually stored, an int or one int per layer;
- `matformer_base_intermediate_size`: the full (tier-0) width B the weights were cut from;
- `matformer_tier`: tier of the stored tensors (B >> t == stored width), derived from the sizes,
  never from the width the model happens to compute at. None for widths that are no tier.
- heads (the second elastic axis): `num_key_value_heads` / `num_attention_heads` are the heads
  stored (an int, or one per layer), `matformer_base_num_key_value_heads` the G they were cut
  from (always written), `head_dim` is always written (it no longer follows from hidden_size once
  heads are cut). The query heads per KV head (r) are the same in every layer.

A per-layer config (Mix'n'Match widths or per-layer heads) is written with `model_type:
"matformer"` (`architectures: ["MatFormerForCausalLM"]`): transformers loads it only through the
classes `import matformer` registers (`matformer.hf`). Per-layer configs written before carry
`llama` and still load here.

Unknown keys are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from matformer.errors import ConfigError
from matformer.models.lm.numerics import LLAMA, Dialect, check_numerics_keys, layer_windows
from matformer.models.lm.rope import RopeSpec, read_rope
from matformer.models.nesting import (
    NESTED_KEYS,
    REWRITTEN,
    NestedConfig,
    check_initializer_range,
    check_positive_int,
    check_positive_number,
    check_token_ids,
    show_value,
)

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
# A per-layer (Mix'n'Match or per-layer heads) config: our loader reads it, and transformers once
# `import matformer` registered these (matformer.hf); stock transformers says "unknown model type".
NESTED_ARCHITECTURE = "MatFormerForCausalLM"
NESTED_MODEL_TYPE = "matformer"

MAX_LAYERS = 100_000
"""More layers than any model has: a config asking for more is damaged (nothing proportional to
num_hidden_layers is allocated before this check)."""


@dataclass
class MatFormerConfig(NestedConfig):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int | list[int] = 11008
    """FFN width stored in the weights: one int, or one int per layer (Mix'n'Match)."""
    num_hidden_layers: int = 32
    num_attention_heads: int | list[int] = 32
    """Query heads stored: one int, or one per layer (heads cut per layer)."""
    num_key_value_heads: int | list[int] | None = None
    """KV heads stored (grouped-query attention): one int or one per layer; None means
    num_attention_heads (plain multi-head attention)."""
    head_dim: int | None = None
    """None means hidden_size // num_attention_heads (of an uncut model)."""
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    initializer_range: float = 0.02
    matformer_base_intermediate_size: int | None = None
    """Full (tier-0) width B. None: B = the stored width (a dense model is tier 0)."""
    matformer_tier: int | None = None
    """Tier of the stored weights as read from a file; recomputed from the sizes on write."""
    matformer_base_num_key_value_heads: int | None = None
    """Full number of KV heads G the heads were cut from. None: G = the stored count."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Unknown config.json keys, kept for the round trip."""

    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    NESTED_ARCHITECTURE: ClassVar[str] = NESTED_ARCHITECTURE
    DIALECT: ClassVar[Dialect] = LLAMA
    """How this family reads the numerics keys (models.lm.numerics.Dialect)."""
    GGUF_ARCH: ClassVar[str] = "llama"
    """llama.cpp's architecture name for a uniform model of this family."""
    _BY_MODEL_TYPE: ClassVar[dict[str, type[MatFormerConfig]]] = {}
    """model_type -> the config class of the Llama-block family that reads it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for mt in (*cls.DIALECT.model_types, cls.nested_model_type()):  # per-layer ones too
            if mt is not None:
                MatFormerConfig._BY_MODEL_TYPE[mt] = cls

    NESTED_MODEL_TYPE: ClassVar[str] = NESTED_MODEL_TYPE
    """Llama's only: a subclass (Mistral, Qwen, ...) writes `matformer_<its type>`
    (`NestedConfig.nested_model_type` reads this from the class's own attributes)."""
    KNOWN: ClassVar[frozenset[str]] = NESTED_KEYS | {
        "vocab_size", "hidden_size", "num_key_value_heads", "max_position_embeddings",
        "rms_norm_eps", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id"}
    REWRITTEN: ClassVar[frozenset[str]] = REWRITTEN
    REQUIRED: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_hidden_layers",
                                           "num_attention_heads", "intermediate_size")

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = copy.copy(self.num_attention_heads)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            check_positive_int(key, getattr(self, key))
        if self.num_hidden_layers > MAX_LAYERS:
            raise ConfigError(f"num_hidden_layers={self.num_hidden_layers} is over the limit of "
                              f"{MAX_LAYERS} layers; the config is damaged or not a model's")
        self._check_scalars()
        self.num_attention_heads = self._per_layer("num_attention_heads")
        self.num_key_value_heads = self._per_layer("num_key_value_heads")
        if self.head_dim is None:
            if not isinstance(self.num_attention_heads, int):
                raise ConfigError("num_attention_heads is a per-layer list; set head_dim explicitly")
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; change one of them or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        self._check_groups()
        self.intermediate_size = self._per_layer("intermediate_size")
        self._check_nested()
        self.rope_theta = float(self.rope_theta)
        view = self._numerics_view()
        self.rope: RopeSpec = read_rope(view)
        """The rotary embedding (models.lm.rope)."""
        self.layer_windows: list[int | None] = layer_windows(view, self.num_hidden_layers,
                                                             self.DIALECT)
        """Attention window of each layer (None: full causal attention)."""

    def _numerics_view(self) -> dict[str, Any]:
        """The keys the numerics readers take, as config.json has them."""
        return {**self.extra, "rope_theta": self.rope_theta,
                "max_position_embeddings": self.max_position_embeddings}

    # ---- what the family computes ------------------------------------------------------------

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections have biases (Qwen2 always; Llama/Qwen3 with attention_bias)."""
        b = self.DIALECT.bias
        return b == "qkv" or (b == "config" and self.extra.get("attention_bias") is True)

    @property
    def o_bias(self) -> bool:
        """o_proj has a bias (Llama/Qwen3 with attention_bias)."""
        return self.DIALECT.bias == "config" and self.extra.get("attention_bias") is True

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm of queries and keys (Qwen3)."""
        return self.DIALECT.qk_norm

    @property
    def sliding(self) -> bool:
        """Some layer attends through a window."""
        return any(w is not None for w in self.layer_windows)

    def keep_layers(self, keep: list[int]) -> None:
        """Keep only layers `keep` (per-layer keys such as `layer_types` follow them); the
        caller re-runs __post_init__."""
        types = self.extra.get("layer_types")
        if self.DIALECT.sliding == "layer_types" and (types is not None or self.sliding):
            # written out per layer: a default from max_window_layers counts layer indices,
            # which renumbering would shift
            types = ["sliding_attention" if w is not None else "full_attention"
                     for w in self.layer_windows]
        if isinstance(types, list) and len(types) == self.num_hidden_layers:
            self.extra["layer_types"] = [types[i] for i in keep]
        self.num_hidden_layers = len(keep)

    def _check_scalars(self) -> None:
        """Types and ranges of the non-size keys: a wrong type is refused, never coerced (a
        string "false" is true in Python; Infinity is no epsilon)."""
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got "
                              f"{show_value(self.tie_word_embeddings)}")
        for key in ("rms_norm_eps", "rope_theta"):
            check_positive_number(key, getattr(self, key))
        check_initializer_range(self.initializer_range)
        check_token_ids(self)

    def _check_groups(self) -> None:
        """The query heads per KV head (r) divide evenly and are the same in every layer."""
        heads, kv = self.layer_heads, self.layer_kv_heads
        ratios = set()
        for i, (nh, g) in enumerate(zip(heads, kv, strict=True)):
            if nh % g:
                raise ConfigError(f"num_attention_heads={nh} is not divisible by "
                                  f"num_key_value_heads={g}" + (f" in layer {i}" if
                                                                 self._varies() else ""))
            ratios.add(nh // g)
        if len(ratios) > 1:
            raise ConfigError(f"num_attention_heads / num_key_value_heads must be the same in every "
                              f"layer (query heads per KV head), got {sorted(ratios)}")

    def _varies(self) -> bool:
        return isinstance(self.num_key_value_heads, list)

    # ---- derived -------------------------------------------------------------------------

    @property
    def layer_heads(self) -> list[int]:
        """Stored query heads of each layer."""
        v = self.num_attention_heads
        return list(v) if isinstance(v, list) else [v] * self.num_hidden_layers

    # ---- config.json ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> Any:
        """As NestedConfig.from_dict; asked of MatFormerConfig, a config.json of another family
        on the Llama block (Mistral, Qwen2, Qwen3) is read as that family's config, so no path
        reads a Mistral as a Llama and silently drops its window."""
        if cls is MatFormerConfig and isinstance(d, dict):
            mt = d.get("model_type")
            if mt not in cls.DIALECT.model_types:
                # (a family whose module is not imported is not here: its model_type is then
                # refused by the Llama dialect, never read as a Llama; models.registry imports
                # every family)
                target = cls._BY_MODEL_TYPE.get(mt) if isinstance(mt, str) else None
                if target is not None:
                    return target.from_dict(d, source=source)
        return super().from_dict(d, source=source)

    @classmethod
    def _check_input(cls, d: dict[str, Any], source: str) -> None:
        # every key that changes the logits: ours, or refused
        check_numerics_keys(d, source, cls.DIALECT)

    @classmethod
    def _read_special(cls, d: dict[str, Any], kwargs: dict[str, Any], extra: dict[str, Any],
                      source: str) -> None:
        """rope_theta from transformers' rope_parameters (the rest is read by models.lm.rope
        from `extra`); per-layer keys checked against the layer count."""
        rope = read_rope(d, source)
        top = d.get("rope_theta")
        if top is None:
            kwargs["rope_theta"] = rope.theta
        elif top != rope.theta:  # transformers would take the nested one without a word
            try:
                check_positive_number("rope_theta", top)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
            raise ConfigError(f"{source}: rope_theta={show_value(top)} disagrees with the rope "
                              f"parameters' rope_theta={rope.theta!r}; make them equal")
        n = d.get("num_hidden_layers")
        if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_LAYERS:
            layer_windows(d, n, cls.DIALECT, source)

    def _write_special(self, d: dict[str, Any]) -> None:
        d["rope_parameters"] = self.rope.to_dict()
        d.pop("rope_scaling", None)  # transformers reads rope_scaling over rope_parameters
        d.setdefault("hidden_act", "silu")
        if self.DIALECT.bias == "config":
            d.setdefault("attention_bias", False)
        d.setdefault("mlp_bias", False)


# Named sizes. `debug` is what tests and examples use; the rest are for real runs. Vocab sizes are
# defaults; training replaces them with the trained tokenizer's size.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "base": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
    "850m": dict(vocab_size=32000, hidden_size=1536, intermediate_size=6144,
                 num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                 max_position_embeddings=2048),
    # FFN-heavy, shaped like the models MatFormer is used for (Gemma 3n: FFN = 8x hidden) with the
    # embeddings a small share of the parameters, so the nested FFN widths differ in what they
    # can do. Parameter splits (shapes.parameter_counts, untied embeddings) are in docs/RESULTS.md.
    "ffn8-micro": dict(vocab_size=512, hidden_size=64, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "ffn8-tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "ffn8-small": dict(vocab_size=8192, hidden_size=384, intermediate_size=3072,
                       num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                       max_position_embeddings=1024),
}
MatFormerConfig.PRESETS = PRESETS


def perplexity(loss: float) -> float:
    """e^loss (losses are natural-log cross-entropies)."""
    return math.exp(min(loss, 700.0))
