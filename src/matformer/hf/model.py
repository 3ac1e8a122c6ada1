"""transformers `PreTrainedModel` classes for matformer's families: causal LMs (with
`GenerationMixin`) and MatViT's image classification.

`model_class(family)` wraps the family's own model (`MatFormerLM`, `MatViT`, ...: the *core*),
built from `config.to_matformer()`. The wrapper adopts the core's child modules under their own
names (`model`, `lm_head`; `vit`, `classifier`), so its parameter names are the checkpoint's and
`from_pretrained` / `save_pretrained` map tensors one to one, while the forward is the core's:
the logits are matformer's, at whatever width the core runs (`set_widths`, `at_width`, one
`tiers.WidthRequest`).

The causal LM's forward takes what transformers passes:

The forward takes what transformers passes:

- `cache`: a `MatFormerCache` (matformer's preallocated `KVCache`, grown by doubling), made on
  the first step when `use_cache`. `generate` is told the model brings its own cache (as
  transformers' recurrent models do), and beams are reordered through `_reorder_cache`.
- `attention_mask`: left padding (batched `generate`, `pipeline`) runs through the core's
  static-shape step (`forward_static`: rotary positions start after each row's padding, padded
  columns hidden), which is what matformer's own batched decoding runs; right padding without a
  cache (training batches) needs nothing, as causal attention never lets a real token see it.
  Anything else (padding in the middle, 4-D masks, `inputs_embeds`) is refused in one line
  rather than computed wrong. `position_ids` are derived, never read.
- `labels`: transformers' causal-LM loss (shifted, -100 ignored, `num_items_in_batch` for the
  Trainer's gradient accumulation), the same number as `lm_loss`.

What a causal-LM family's model must provide (matformer's own decoding uses the same):
`forward(input_ids, cache=, start=)`, `forward_static(input_ids, input_pos, cache, pad)`,
`new_cache(batch, max_len, kv_heads=)` with a `KVCache`-like result (`k`, `v`, `length`,
`max_len`, `kv_heads`, `crop`), the `WidthSetting` mixin, and children named as its checkpoint's
tensors.

PEFT LoRA wraps the projections; the core calls them as modules at their stored size, so an
adapter trains and runs there, and a narrower setting of a wrapped layer is refused
(`models.lm.model`). The classes are made on first use (importing this module imports no
transformers); `register_models()`, called by the import hook of `matformer.hf` once
transformers' Auto model classes have loaded, registers them with `AutoModelForCausalLM` and
`AutoModelForImageClassification`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from matformer.errors import TierError
from matformer.hf.config import base_config_class, built_once, config_class, hf_families
from matformer.models.registry import CAUSAL_LM, IMAGE_CLASSIFICATION, Family
from matformer.tiers import WidthRequest

_AUTO_MODEL = "transformers.models.auto.modeling_auto"
_state: dict[str, Any] = {"classes": None, "building": False}


class MatFormerCache:
    """A generation cache: matformer's `KVCache` for `batch` rows at the core's active heads,
    grown (doubled, up to `max_position_embeddings`) as the sequence outgrows it."""

    is_compileable = False

    def __init__(self, core: nn.Module, batch: int, capacity: int = 64) -> None:
        self.core = core
        limit = core.config.max_position_embeddings
        self.kv = core.new_cache(batch, min(capacity, limit))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.length

    def __len__(self) -> int:
        return self.core.config.num_hidden_layers

    def reserve(self, length: int) -> None:
        """Room for `length` positions (a longer cache, the valid prefix copied)."""
        if length <= self.kv.max_len:
            return
        limit = self.core.config.max_position_embeddings
        # past the limit, new_cache refuses in one line (a TierError naming it)
        grown = self.core.new_cache(self.kv.k[0].shape[0],
                                    max(length, min(2 * self.kv.max_len, limit)),
                                    kv_heads=self.kv.kv_heads)
        n = self.kv.length
        for old, new in ((self.kv.k, grown.k), (self.kv.v, grown.v)):
            for a, b in zip(old, new, strict=True):
                b[:, :, :n] = a[:, :, :n]
        grown.length = n
        self.kv = grown

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Keep rows `beam_idx` (beam search)."""
        for cache in (self.kv.k, self.kv.v):
            for i, t in enumerate(cache):
                cache[i] = t.index_select(0, beam_idx.to(t.device))

    def crop(self, length: int) -> None:
        self.kv.crop(length)


def _left_padding(mask: torch.Tensor | None, cached: bool) -> torch.Tensor | None:
    """Per row, the padding columns before its first token; None when there is none to honour.
    Refuses masks whose padding the core cannot run exactly."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"attention_mask of {mask.dim()} dimensions: matformer's transformers "
                         f"model takes a 2-D (batch, length) padding mask")
    m = mask.to(torch.bool)
    if bool(m.all()):
        return None
    pad = (~m).to(torch.int64).cumprod(dim=1).sum(dim=1)  # leading zeros per row
    cols = torch.arange(m.shape[1], device=m.device)[None, :]
    if bool(((cols >= pad[:, None]) == m).all()):  # zeros then ones: left padding
        return pad
    ones = m.to(torch.int64).sum(dim=1)
    if not cached and bool(((cols < ones[:, None]) == m).all()):
        return None  # right padding, no cache: no real token attends to it (causal)
    raise ValueError("attention_mask pads inside a sequence: matformer's transformers model runs "
                     "left padding (and right padding without a cache) only")


def _define() -> dict[str, Any]:
    """The classes that subclass transformers' (imported here, not with this module)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        GenerationMixin,
        PreTrainedModel,
    )
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast, ImageClassifierOutput

    # The output field transformers reads the cache from (`cache` since 5.x).
    cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else (
        "past_key_values")

    class CoreBackedModel(PreTrainedModel):
        """What every matformer transformers class shares: the family's own model (the core) built
        from the config, its children adopted under their own names, its width setting."""

        config_class = base_config_class()
        supports_gradient_checkpointing = False
        _supports_sdpa = True

        def __init__(self, config: Any) -> None:  # a MatFormerPreTrainedConfig
            super().__init__(config)
            fam = type(config).family()
            core = fam.model_class()(config.to_matformer())
            object.__setattr__(self, "_core", core)  # not a submodule: its children are ours
            for name, child in core.named_children():
                setattr(self, name, child)
            self.post_init()

        # ---- the matformer model ----------------------------------------------------------------

        @property
        def matformer(self) -> nn.Module:
            """The family's own model (`MatFormerLM`, `MatViT`, ...), sharing every parameter with
            this one: what `matformer.generate`, `evaluate` and `save_model` take."""
            return self._core

        def set_widths(self, *, tier: int | None = None, layer_tiers: Sequence[int] | None = None,
                       widths: int | Sequence[int] | None = None, kv_heads: int | None = None,
                       layer_kv_heads: Sequence[int] | None = None) -> CoreBackedModel:
            """Run at another FFN width / KV heads from now on (an axis not named goes back to
            what is stored); see `models.nesting.WidthSetting.set_widths`."""
            self._core.apply(WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths,
                                          kv_heads=kv_heads, layer_kv_heads=layer_kv_heads))
            return self

        @contextlib.contextmanager
        def at_width(self, *, tier: int | None = None, layer_tiers: Sequence[int] | None = None,
                     widths: int | Sequence[int] | None = None, kv_heads: int | None = None,
                     layer_kv_heads: Sequence[int] | None = None) -> Iterator[CoreBackedModel]:
            """Run at another setting inside a `with` block; the previous one is restored after."""
            with self._core.running(WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths,
                                                 kv_heads=kv_heads, layer_kv_heads=layer_kv_heads)):
                yield self

        @property
        def widths(self) -> list[int]:
            """Active FFN width of each layer."""
            return self._core.widths

        @property
        def layer_kv_heads(self) -> list[int]:
            """Active KV heads of each layer."""
            return self._core.layer_kv_heads

        @property
        def tier(self) -> int | None:
            """The uniform tier the model runs at (None: per-layer widths)."""
            return self._core.tier

        def _init_weights(self, module: nn.Module) -> None:
            """For weights a checkpoint lacks: N(0, initializer_range) for linears, convolutions
            and embeddings (zero biases), norms at identity."""
            std = self._core.config.initializer_range
            with torch.no_grad():
                if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                    module.weight.normal_(0.0, std)
                elif isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                    module.weight.fill_(1.0)
                if isinstance(getattr(module, "bias", None), torch.Tensor):
                    module.bias.zero_()


    class MatFormerPreTrainedModel(CoreBackedModel):
        """Base of the causal-LM classes (`model_class(family)`, which add `GenerationMixin`:
        transformers wants it among a generating class's own bases)."""

        base_model_prefix = "model"
        main_input_name = "input_ids"
        _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"rotary_emb\.inv_freq"]

        # ---- transformers ------------------------------------------------------------------------

        def get_input_embeddings(self) -> nn.Module:
            return self._core.model.embed_tokens

        def get_output_embeddings(self) -> nn.Module:
            return self._core.lm_head

        @classmethod
        def _supports_default_dynamic_cache(cls) -> bool:
            return False  # generate leaves the cache to the forward (a MatFormerCache)

        def _reorder_cache(self, cache: MatFormerCache, beam_idx: torch.Tensor) -> MatFormerCache:
            cache.reorder(beam_idx)
            return cache

        def forward(self, input_ids: torch.LongTensor | None = None,
                    attention_mask: torch.Tensor | None = None,
                    position_ids: torch.LongTensor | None = None,
                    cache: MatFormerCache | Cache | None = None,
                    inputs_embeds: torch.Tensor | None = None,
                    labels: torch.LongTensor | None = None,
                    use_cache: bool | None = None,
                    logits_to_keep: int | torch.Tensor = 0,
                    past_key_values: MatFormerCache | Cache | None = None,
                    **kwargs: Any) -> CausalLMOutputWithPast:
            """input_ids (B, T) -> logits (B, T, V) at the active width (see the module docstring
            for the cache, mask and loss)."""
            if inputs_embeds is not None or input_ids is None:
                raise ValueError("matformer's transformers model takes input_ids (inputs_embeds is "
                                 "not supported)")
            for key in ("output_attentions", "output_hidden_states"):
                if kwargs.get(key):
                    raise ValueError(f"{key}=True: matformer's transformers model returns logits "
                                     f"(and the loss and cache) only")
            cache = cache if cache is not None else past_key_values
            if use_cache is None:
                use_cache = not self.training and getattr(self.config, "use_cache", True)
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                cache = None  # an empty transformers cache: ours replaces it
            if cache is not None and not isinstance(cache, MatFormerCache):
                raise ValueError(f"cache: a {type(cache).__name__} holds no matformer keys; pass "
                                 f"the MatFormerCache a previous call returned, or none")
            if cache is None and use_cache:
                cache = MatFormerCache(self._core, input_ids.shape[0])
            pad = _left_padding(attention_mask, cache is not None)
            logits = self._run(input_ids, cache, pad)
            if isinstance(logits_to_keep, int):
                if logits_to_keep:
                    logits = logits[:, -logits_to_keep:]
            else:
                logits = logits[:, logits_to_keep]
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels,
                                          vocab_size=self._core.config.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits,
                                          **{cache_field: cache if use_cache else None})

        def _run(self, input_ids: torch.Tensor, cache: MatFormerCache | None,
                 pad: torch.Tensor | None) -> torch.Tensor:
            core = self._core
            B, T = input_ids.shape
            if cache is None:
                if pad is None:
                    return core(input_ids)
                kv = core.new_cache(B, T)
                return core.forward_static(input_ids, torch.arange(T, device=input_ids.device), kv,
                                           pad.to(input_ids.device))
            if cache.kv.k[0].shape[0] != B:
                raise ValueError(f"cache holds {cache.kv.k[0].shape[0]} sequences; input_ids has {B}")
            start = cache.kv.length
            cache.reserve(start + T)
            if cache.kv.kv_heads != core.layer_kv_heads:
                raise TierError("the KV heads changed since this cache was made; start a new one")
            if pad is None:
                return core(input_ids, cache=cache.kv, start=start)
            logits = core.forward_static(input_ids, torch.arange(start, start + T,
                                                                 device=input_ids.device),
                                         cache.kv, pad.to(input_ids.device))
            cache.kv.length = start + T
            return logits


    class MatViTPreTrainedModel(CoreBackedModel):
        """Base of the image-classification classes: `forward(pixel_values, labels=None)` ->
        logits (B, num_labels) at the active width, and the cross-entropy when labels are given."""

        base_model_prefix = "vit"
        main_input_name = "pixel_values"

        def forward(self, pixel_values: torch.Tensor | None = None,
                    labels: torch.LongTensor | None = None, **kwargs: Any) -> ImageClassifierOutput:
            if pixel_values is None:
                raise ValueError("MatViT takes pixel_values (batch, channels, height, width)")
            logits = self._core(pixel_values)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits.float(), labels.to(logits.device))
            return ImageClassifierOutput(loss=loss, logits=logits)

    classes: dict[str, Any] = {
        "CoreBackedModel": CoreBackedModel, "MatFormerPreTrainedModel": MatFormerPreTrainedModel,
        "MatViTPreTrainedModel": MatViTPreTrainedModel}
    for name, cls in classes.items():
        cls.__qualname__ = name
    classes["tasks"] = {  # task -> (the bases of its classes, the Auto class they register with)
        CAUSAL_LM: ((MatFormerPreTrainedModel, GenerationMixin), AutoModelForCausalLM),
        IMAGE_CLASSIFICATION: ((MatViTPreTrainedModel,), AutoModelForImageClassification),
    }
    return classes


def _classes() -> dict[str, Any]:
    return built_once(_state, "classes", _define, _AUTO_MODEL, register_models)


_CLASSES: dict[str, type] = {}


def model_class(family: Family | str = "lm") -> type:
    """The transformers model class of a family (made on first use), named as its per-layer
    config's `architectures` says (`MatFormerForCausalLM`, `MatViTForImageClassification`)."""
    cfg = config_class(family)
    fam = cfg.family()
    tasks = _classes()["tasks"]  # first: making the bases may register (and so make) this one
    if fam.name not in _CLASSES:
        assert fam.config_class is not None
        name = fam.config_class.NESTED_ARCHITECTURE
        cls = type(name, tasks[fam.task][0], {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"matformer's {fam.name!r} family as a transformers {fam.task} model.",
            "config_class": cfg,
            "_tied_weights_keys": dict(fam.tied)})
        _CLASSES[fam.name] = cls  # importable by name (pickling): this module's __getattr__
    return _CLASSES[fam.name]


def register_models() -> None:
    """Register every family's class with the Auto class of its task (`AutoModelForCausalLM`,
    `AutoModelForImageClassification`): what the import hook of `matformer.hf` calls once
    transformers' Auto model classes have loaded."""
    if _state["building"]:
        return  # fired by our own import of transformers: _classes registers after
    tasks = _classes()["tasks"]
    for fam in hf_families():
        tasks[fam.task][1].register(config_class(fam), model_class(fam), exist_ok=True)


def __getattr__(name: str) -> Any:
    """The classes by name, made on first use: the bases (`CoreBackedModel`,
    `MatFormerPreTrainedModel`, `MatViTPreTrainedModel`) and each family's
    (`MatFormerForCausalLM` for `lm`, `MatViTForImageClassification` for `vit`, ...)."""
    if name in ("CoreBackedModel", "MatFormerPreTrainedModel", "MatViTPreTrainedModel"):
        return _classes()[name]
    for fam in hf_families():
        if fam.config_class is not None and fam.config_class.NESTED_ARCHITECTURE == name:
            return model_class(fam)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
