"""The served model names and the width setting each names.

One checkpoint is served under one NAME (its folder's name). A request picks its width with the
model name's suffix or with the body's extra `width` field:

- `NAME`: the widths and heads the checkpoint stores (its full width);
- `NAME@tier-T`: uniform tier T (FFN width base >> T), stored heads;
- `NAME@widths=W1,W2,...`: one FFN width per layer (a Mix'n'Match plan; one number: every layer);
- `NAME@auto`: the server chooses per step (`policy.LoadPolicy`).

`GET /v1/models` lists `NAME`, every runnable tier, the paper's least-slope Mix'n'Match plans
between neighbouring tiers, and `NAME@auto`. Any width the checkpoint holds is accepted, listed
or not; one it does not hold is a `TierError` (a 400 to the client).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from matformer.errors import TierError
from matformer.tiers import (
    Setting,
    WidthRequest,
    mix_n_match_plans,
    parse_int_list,
    runnable_tiers,
    uniform_tier,
)

AUTO = "auto"

LISTED_TIERS = 4
"""Uniform tiers listed and chosen by `auto`: 0..3, the paper's XL, L, M, S (narrower ones are
served when asked for by name)."""


@dataclass(frozen=True)
class Width:
    """A resolved width: its setting (None for `auto`) and the name it is reported under."""

    name: str
    setting: Setting | None

    @property
    def auto(self) -> bool:
        return self.setting is None


def setting_key(setting: Setting) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A hashable key of a setting (rows of one key run in one batched forward)."""
    return tuple(setting.widths), tuple(setting.kv_heads)


class Catalog:
    """The names one loaded model answers to, and the settings they name."""

    def __init__(self, name: str, model: Any) -> None:
        if "@" in name or not name:
            raise TierError(f"model name {name!r} must be non-empty and hold no '@'")
        self.name = name
        self.model = model
        self.base = model.base_width
        self.stored = Setting(list(model.stored_widths), list(model.stored_kv_heads))
        self.num_layers = len(self.stored.widths)
        self.tiers = runnable_tiers(self.base, self.stored.widths, limit=LISTED_TIERS)

    def full(self) -> Width:
        """The stored setting, under NAME."""
        return Width(self.name, self.stored)

    def tier_widths(self) -> list[Width]:
        """Every runnable uniform tier at the stored heads, widest first."""
        return [self.named(Setting([self.base >> t] * self.num_layers, self.stored.kv_heads))
                for t in self.tiers]

    def listed(self) -> list[str]:
        """The names `/v1/models` lists: NAME, NAME@tier-T..., the Mix'n'Match plans, auto."""
        names = [self.name]
        names += [w.name for w in self.tier_widths() if w.name != self.name]
        for plan in mix_n_match_plans(self.base, self.num_layers, self.tiers):
            if all(w <= s for w, s in zip(plan, self.stored.widths, strict=True)):
                names.append(self.named(Setting(plan, self.stored.kv_heads)).name)
        names.append(f"{self.name}@{AUTO}")
        return list(dict.fromkeys(names))

    def named(self, setting: Setting) -> Width:
        """The canonical name of `setting`: NAME when stored, NAME@tier-T for a uniform tier,
        else NAME@widths=...; heads other than stored add `,kv_heads=...`."""
        if setting.widths == self.stored.widths and setting.kv_heads == self.stored.kv_heads:
            return Width(self.name, setting)
        t = uniform_tier(self.base, setting.widths)
        suffix = f"tier-{t}" if t is not None else "widths=" + ",".join(map(str, setting.widths))
        if setting.kv_heads != self.stored.kv_heads:
            suffix += ",layer_kv_heads=" + "+".join(map(str, setting.kv_heads))
        return Width(f"{self.name}@{suffix}", setting)

    def resolve(self, model: str, width: Any = None) -> Width:
        """The width a request asks for: the model name's suffix, or the body's `width` field
        (a suffix string, a tier as an int, or a list of per-layer widths). Unknown model
        names raise `LookupError`; widths not held, `TierError`."""
        if not isinstance(model, str):
            raise TierError(f"model must be a string, got {type(model).__name__}")
        head, sep, suffix = model.partition("@")
        if head != self.name:
            raise LookupError(f"the model {model!r} does not exist; this server serves "
                              f"{self.name!r} (GET /v1/models lists its widths)")
        from_name = self.parse(suffix) if sep else None
        from_body = self.parse_field(width) if width is not None else None
        if from_name is not None and from_body is not None and from_name != from_body:
            raise TierError(f"the model name asks for {from_name.name} and the width field for "
                            f"{from_body.name}; give one")
        return from_body or from_name or self.full()

    def parse_field(self, width: Any) -> Width:
        """The body's `width`: 'tier-2' / 'widths=...' / 'auto', an int tier, or a list."""
        if isinstance(width, bool):
            raise TierError(f"width must be a tier, a width list or a name suffix, got {width!r}")
        if isinstance(width, int):
            return self.request(WidthRequest(tier=width))
        if isinstance(width, str):
            return self.parse(width)
        if isinstance(width, list) and all(isinstance(w, int) and not isinstance(w, bool)
                                           for w in width):
            return self.request(WidthRequest(widths=list(width)))
        raise TierError(f"width must be a tier (int), a list of per-layer widths, or a name "
                        f"suffix such as 'tier-1' or 'auto'; got {width!r}")

    def parse(self, suffix: str) -> Width:
        """A name suffix ('tier-2', 'widths=256,512', 'auto', 'tier-1,kv_heads=2')."""
        if suffix == AUTO:
            return Width(f"{self.name}@{AUTO}", None)
        keywords: dict[str, Any] = {}
        for part in _split(suffix):
            key, sep, value = part.partition("=") if "=" in part else part.partition("-")
            if not sep or not value:
                raise TierError(f"unknown width {suffix!r}: use tier-T, widths=W1,W2,... or auto")
            key = key.strip().replace("-", "_")
            if key in ("tier", "kv_heads"):
                keywords[key] = _one_int(value, key)
            elif key in ("widths", "layer_tiers", "layer_kv_heads"):
                keywords[key] = parse_int_list(value.replace("+", ","), key)
            else:
                raise TierError(f"unknown width {suffix!r}: use tier-T, widths=W1,W2,... or auto")
        return self.request(WidthRequest(**keywords))

    def request(self, request: WidthRequest) -> Width:
        """A `WidthRequest` checked against the stored model (a TierError if not held)."""
        setting = request.resolve_against(self.base, self.stored.widths, self.model.base_kv_heads,
                                          self.stored.kv_heads, holder="this server's model",
                                          remedy="ask for a narrower width (GET /v1/models)")
        return self.named(setting)


def _split(suffix: str) -> list[str]:
    """'widths=1,2,kv_heads=1' -> ['widths=1,2', 'kv_heads=1']: a part starts at a key."""
    parts: list[str] = []
    for piece in suffix.split(","):
        if parts and ("=" not in piece and "-" not in piece or piece.strip().isdigit()):
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    return parts


def _one_int(value: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise TierError(f"{key} must be an integer, got {value!r}") from None

