"""The width setting of a nested model, shared by both model families (MatFormerLM, MatViT).

A model mixes in `WidthSetting` and names, per layer, the module that holds its FFN width
(`width`, `stored_width`) and the one that holds its KV heads (`kv_heads`, `stored_kv_heads`);
reading, validating, setting and temporarily changing the setting is then written once here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Self

from matformer.tiers import Setting, WidthRequest, uniform_kv_heads, uniform_tier


class WidthSetting:
    """Mixin: `widths`/`tier`/`layer_kv_heads`/`kv_heads`, `resolve_*`, `set_widths`, `at_width`.

    The model provides `config.base`, `config.base_kv_heads` and `_width_slots()`."""

    config: Any

    def _width_slots(self) -> list[tuple[Any, Any]]:
        """Per layer: (module with `width`/`stored_width`, module with `kv_heads`/`stored_kv_heads`)."""
        raise NotImplementedError

    @property
    def base_width(self) -> int:
        return self.config.base

    @property
    def base_kv_heads(self) -> int:
        return self.config.base_kv_heads

    @property
    def stored_widths(self) -> list[int]:
        return [ffn.stored_width for ffn, _ in self._width_slots()]

    @property
    def widths(self) -> list[int]:
        """Active FFN width of each layer."""
        return [ffn.width for ffn, _ in self._width_slots()]

    @property
    def tier(self) -> int | None:
        """Uniform tier the model currently computes at, or None for a Mix'n'Match setting."""
        return uniform_tier(self.base_width, self.widths)

    @property
    def stored_kv_heads(self) -> list[int]:
        """KV heads each layer stores."""
        return [attn.stored_kv_heads for _, attn in self._width_slots()]

    @property
    def layer_kv_heads(self) -> list[int]:
        """Active KV heads of each layer."""
        return [attn.kv_heads for _, attn in self._width_slots()]

    @property
    def kv_heads(self) -> int | None:
        """KV heads every layer currently runs, or None when the layers differ."""
        return uniform_kv_heads(self.layer_kv_heads)

    @property
    def setting(self) -> dict[str, list[int]]:
        """The active setting as `set_widths` keywords (restores it exactly)."""
        return {"widths": self.widths, "layer_kv_heads": self.layer_kv_heads}

    def resolve(self, request: WidthRequest, *, current: bool = False) -> Setting:
        """`request` checked against what this model stores: (per-layer widths, per-layer KV
        heads). An axis the request does not name is as stored, or with `current` as the model
        runs now (a call that runs at a width for that call only)."""
        setting = request.resolve_against(self.base_width, self.stored_widths,
                                          self.base_kv_heads, self.stored_kv_heads)
        if current:
            setting = Setting(setting.widths if request.names_ffn else self.widths,
                              setting.kv_heads if request.names_heads else self.layer_kv_heads)
        return setting

    def resolve_widths(self, *, tier: int | None = None, layer_tiers: Sequence[int] | None = None,
                       widths: int | Sequence[int] | None = None) -> list[int]:
        """Validated per-layer widths for a request (no argument: the stored widths); tiers are
        absolute (relative to the base). A width wider than a layer stores is a TierError."""
        request = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths)
        return self.resolve(request).widths

    def resolve_kv_heads(self, *, kv_heads: int | None = None,
                         layer_kv_heads: Sequence[int] | None = None) -> list[int]:
        """Validated per-layer KV heads for a request (no argument: the stored heads). More heads
        than a layer stores is a TierError."""
        return self.resolve(WidthRequest(kv_heads=kv_heads, layer_kv_heads=layer_kv_heads)).kv_heads

    def apply(self, request: WidthRequest | Setting) -> Self:
        """Run at `request` (an axis it does not name goes back to what is stored), or at an
        already resolved `Setting` (from `resolve`: not checked again)."""
        setting = request if isinstance(request, Setting) else self.resolve(request)
        slots = self._width_slots()
        for (ffn, attn), w, g in zip(slots, setting.widths, setting.kv_heads, strict=True):
            ffn.width = w
            attn.kv_heads = g
        return self

    def set_widths(self, *, tier: int | None = None, layer_tiers: Sequence[int] | None = None,
                   widths: int | Sequence[int] | None = None, kv_heads: int | None = None,
                   layer_kv_heads: Sequence[int] | None = None) -> Self:
        """Set the active FFN width (`tier`/`layer_tiers`/`widths`) and KV heads (`kv_heads`/
        `layer_kv_heads`) of every layer. An axis not named goes back to what is stored (no
        argument: the stored model)."""
        return self.apply(WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths,
                                       kv_heads=kv_heads, layer_kv_heads=layer_kv_heads))

    @contextlib.contextmanager
    def running(self, request: WidthRequest | Setting) -> Iterator[Self]:
        """Run at `request` inside a `with` block (as `apply`); the previous setting (widths and
        heads) is restored after."""
        previous = Setting(self.widths, self.layer_kv_heads)
        self.apply(request)
        try:
            yield self
        finally:
            self.apply(previous)

    def at_width(self, *, tier: int | None = None, layer_tiers: Sequence[int] | None = None,
                 widths: int | Sequence[int] | None = None, kv_heads: int | None = None,
                 layer_kv_heads: Sequence[int] | None = None
                 ) -> contextlib.AbstractContextManager[Self]:
        """Run at another setting inside a `with` block (as `set_widths`); the previous setting
        (widths and heads) is restored after."""
        return self.running(WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths,
                                         kv_heads=kv_heads, layer_kv_heads=layer_kv_heads))
