"""Width and tier arithmetic: the one place that knows what "tier t" means.

Tier t of a model whose full (tier-0) FFN width is B is the width B >> t, defined only when B is
divisible by 2**t. A per-layer list of widths (Mix'n'Match) may mix tiers, or hold widths that
are no tier at all; such a list has no uniform tier.

Vocabulary (used everywhere in matformer): a `tier` is one uniform tier; `layer_tiers` is one
tier per layer; `widths` is one FFN width per layer (a "width plan"); several of those are
`plans` (a list of width plans) or `uniform_tiers` (a list of uniform tiers).

A request for one setting of both axes is a `WidthRequest` (the five keywords above in one frozen
value, checked once against a config by `WidthRequest.resolve`); public functions take the
keywords and build one at the door, internal ones pass it on.

Also here: which tiers a stored model can run (`runnable_tiers`), the one "stores X, needs width
Y" error (`check_held`), the paper's least-slope Mix'n'Match plans, and the same arithmetic for
the second elastic axis, attention heads (`kv_heads` uniform, `layer_kv_heads` per layer; see
the heads section at the end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from matformer.errors import TierError


def width_of(base: int, tier: int) -> int:
    """Width of tier `tier` for base width `base`: base >> tier, exact or an error."""
    if isinstance(tier, bool) or not isinstance(tier, int) or tier < 0:
        raise TierError(f"tier must be a non-negative integer, got {tier!r}")
    if base <= 0:
        raise TierError(f"base width must be positive, got {base}")
    if tier > 64 and tier >= base.bit_length():  # 2^tier > base, and too big to compute or print
        raise TierError(f"tier {tier if tier < 10**6 else 'of ' + str(tier.bit_length()) + ' bits'} "
                        f"is beyond base width {base} (largest tier: {max_tier(base)})")
    if base % (1 << tier) != 0:
        raise TierError(
            f"tier {tier} needs a base width divisible by 2^{tier}={1 << tier}; "
            f"base {base} is not (largest tier for this base: {max_tier(base)})"
        )
    return base >> tier


def tier_of(base: int, width: int) -> int | None:
    """The exact tier t with width == base >> t, or None when `width` is no tier of `base`."""
    if base <= 0 or width <= 0 or width > base or base % width != 0:
        return None
    ratio = base // width
    if ratio & (ratio - 1):
        return None
    return ratio.bit_length() - 1


def max_tier(base: int) -> int:
    """The largest tier `base` can be divided into exactly (the number of trailing zero bits)."""
    if base <= 0:
        raise TierError(f"base width must be positive, got {base}")
    return (base & -base).bit_length() - 1


def runnable_tiers(base: int, stored: int | Sequence[int], limit: int | None = None) -> list[int]:
    """Tiers a model storing `stored` widths can run by runtime slicing: those whose width fits
    within every stored layer width, counted from tier 0 (at most `limit` of them)."""
    stored_list = [stored] if isinstance(stored, int) else list(stored)
    smallest = min(stored_list)
    top = max_tier(base) if limit is None else min(max_tier(base), limit - 1)
    return [t for t in range(top + 1) if (base >> t) <= smallest]


def uniform_tier(base: int, widths: int | Sequence[int]) -> int | None:
    """Tier of a whole model whose layers store `widths`: the common tier if every layer has the
    same width and it is a tier of `base`, else None."""
    if isinstance(widths, int):
        return tier_of(base, widths)
    ws = list(widths)
    if not ws or any(w != ws[0] for w in ws):
        return None
    return tier_of(base, ws[0])


def resolve_widths(
    base: int,
    num_layers: int,
    *,
    tier: int | None = None,
    layer_tiers: Sequence[int] | None = None,
    widths: int | Sequence[int] | None = None,
) -> list[int]:
    """Turn exactly one of a `tier`, `layer_tiers` (one tier per layer), or `widths` (one per
    layer, or one int for every layer) into a validated per-layer width list (widths are
    absolute: relative to `base`)."""
    given = [name for name, v in (("tier", tier), ("layer_tiers", layer_tiers), ("widths", widths))
             if v is not None]
    if len(given) != 1:
        raise TierError(f"give exactly one of tier, layer_tiers, widths (got {given or 'none'})")
    if tier is not None:
        return [width_of(base, tier)] * num_layers
    if layer_tiers is not None:
        tl = list(layer_tiers)
        if len(tl) != num_layers:
            raise TierError(f"got {len(tl)} per-layer tiers for a model of {num_layers} layers")
        return [width_of(base, t) for t in tl]
    assert widths is not None
    wl = [widths] * num_layers if isinstance(widths, int) else [int(w) for w in widths]
    if len(wl) != num_layers:
        raise TierError(f"got {len(wl)} per-layer widths for a model of {num_layers} layers")
    for i, w in enumerate(wl):
        if not 0 < w <= base:
            raise TierError(f"width {w} of layer {i} is outside 1..{base} (the base width)")
    return wl


def check_held(
    base: int,
    stored: Sequence[int],
    widths: Sequence[int],
    *,
    holder: str = "this model",
    remedy: str = "load the full checkpoint",
    tier: int | None = None,
    layers: Sequence[int] | None = None,
) -> None:
    """The one "stores X, needs width Y" check: a `TierError` when a requested per-layer width is
    wider than the width its layer stores (runtime slicing only narrows).

    `holder` names what stores the weights ("this model", "CKPT: this checkpoint", "the
    source"); `remedy` says what to do; `tier`: the uniform tier that was asked for, if one was.
    `layers`: the stored layer each entry is cut from, when the request renumbers them (an
    extraction dropping layers); the entry is then named as an output layer."""
    for j, (w, s) in enumerate(zip(widths, stored, strict=True)):
        if w <= s:
            continue
        i = j if layers is None else layers[j]
        st = uniform_tier(base, stored)
        held = f"tier {st}, width {s}" if st is not None else f"width {s} in layer {i}"
        where = f"layer {i}" if layers is None else f"output layer {j}"
        wt = tier_of(base, w)
        if tier is not None and layers is None:
            want = f"tier {tier}"
        else:
            want = f"tier {wt} ({where})" if wt is not None else where
        raise TierError(f"{holder} stores {held}; {want} needs width {w} — {remedy} "
                        f"(base width {base})")


# ---- Mix'n'Match: least-slope width plans -------------------------------------------------------


def least_slope_plan(narrow: int, wide: int, num_layers: int, wide_layers: int) -> list[int]:
    """The paper's least-slope Mix'n'Match shape: widths non-decreasing with depth, one change:
    the first layers at `narrow`, the last `wide_layers` at `wide`."""
    if not 0 <= wide_layers <= num_layers:
        raise TierError(f"wide_layers={wide_layers} is outside 0..{num_layers}")
    return [narrow] * (num_layers - wide_layers) + [wide] * wide_layers


def least_slope_plans(widths: Sequence[int], num_layers: int,
                      wide_layers: Sequence[int] | None = None) -> list[list[int]]:
    """Least-slope plans between each pair of neighbouring `widths` (narrow first): for every
    pair, one plan per count of wide last layers in `wide_layers` (default 0..num_layers)."""
    ws = sorted(set(widths))
    counts = range(num_layers + 1) if wide_layers is None else wide_layers
    return [least_slope_plan(narrow, wide, num_layers, k)
            for narrow, wide in zip(ws, ws[1:], strict=False) for k in counts]


def mix_n_match_plans(base: int, num_layers: int, uniform_tiers: Sequence[int]) -> list[list[int]]:
    """The Mix'n'Match points evaluated by default: between each pair of neighbouring
    `uniform_tiers`, least-slope plans with the last k layers at the wider tier, k about L/4,
    L/2 and 3L/4."""
    ks = sorted({round(num_layers * f) for f in (0.25, 0.5, 0.75)} - {0, num_layers})
    return least_slope_plans([width_of(base, t) for t in uniform_tiers], num_layers, ks)


def parse_int_list(text: str, what: str = "list") -> list[int]:
    """Parse '1,2,3' (the CLI's list syntax) into ints, with an error naming `what`."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise TierError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:  # '' or ',': every caller needs at least one (min()/max() of nothing)
        raise TierError(f"{what} must list at least one integer, got {text!r}")
    return values


def describe_widths(base: int, widths: Sequence[int]) -> str:
    """Short human description: 'tier 2 (width 256)' or 'mix [512,512,256,...]'."""
    t = uniform_tier(base, widths)
    if t is not None:
        return f"tier {t} (width {widths[0]})"
    return "mix[" + ",".join(str(w) for w in widths) + "]"


# ---- attention heads: the second elastic axis ---------------------------------------------------
#
# Heads nest by KV group: keeping g of the G stored KV heads keeps those KV heads and the r query
# heads that read each of them (r = num_attention_heads / num_key_value_heads, fixed). Any
# 1 <= g <= stored heads is runnable (the weights of g heads are a prefix of the stored ones);
# the *granularities* training targets and evaluation reports by default are G, G/2, G/4, ...
# (halving while exact) and then 1: for G=8: 8,4,2,1; G=6: 6,3,1; G=5: 5,1.


def head_granularities(base_kv_heads: int) -> list[int]:
    """The KV head counts a model of `base_kv_heads` (G) nests by default: G, G/2, ... (while the
    halving is exact), then 1; widest first."""
    if isinstance(base_kv_heads, bool) or not isinstance(base_kv_heads, int) or base_kv_heads <= 0:
        raise TierError(f"base KV head count must be a positive integer, got {base_kv_heads!r}")
    out = [base_kv_heads]
    while out[-1] % 2 == 0:
        out.append(out[-1] // 2)
    if out[-1] != 1:
        out.append(1)
    return out


def runnable_kv_heads(base_kv_heads: int, stored: int | Sequence[int]) -> list[int]:
    """Head granularities a model storing `stored` KV heads (per layer) can run: those held by
    every layer, widest first."""
    smallest = stored if isinstance(stored, int) else min(stored)
    return [g for g in head_granularities(base_kv_heads) if g <= smallest]


def resolve_kv_heads(base_kv_heads: int, num_layers: int, *, kv_heads: int | None = None,
                     layer_kv_heads: Sequence[int] | None = None) -> list[int]:
    """Turn one of `kv_heads` (every layer) or `layer_kv_heads` (one per layer) into a validated
    per-layer list of KV head counts, each in 1..`base_kv_heads`."""
    if kv_heads is not None and layer_kv_heads is not None:
        raise TierError("give kv_heads or layer_kv_heads, not both")
    if kv_heads is None and layer_kv_heads is None:
        raise TierError("give kv_heads or layer_kv_heads")
    if kv_heads is not None:
        hl = [kv_heads] * num_layers
    else:
        hl = list(layer_kv_heads)  # type: ignore[arg-type]
        if len(hl) != num_layers:
            raise TierError(f"got {len(hl)} per-layer KV head counts for a model of {num_layers} "
                            f"layers")
    for i, g in enumerate(hl):
        if isinstance(g, bool) or not isinstance(g, int) or not 0 < g <= base_kv_heads:
            raise TierError(f"KV head count {g!r} of layer {i} is outside 1..{base_kv_heads} (the "
                            f"base number of KV heads)")
    return hl


def check_heads_held(
    stored: Sequence[int],
    kv_heads: Sequence[int],
    *,
    holder: str = "this model",
    remedy: str = "load the full checkpoint",
    uniform: int | None = None,
    layers: Sequence[int] | None = None,
) -> None:
    """The heads twin of `check_held`: a `TierError` when a layer is asked to run more KV heads
    than it stores (runtime slicing only drops heads). `uniform`: the kv_heads asked for, if one
    count for every layer; `layers`: the stored layer each entry is cut from (see check_held)."""
    for j, (g, s) in enumerate(zip(kv_heads, stored, strict=True)):
        if g <= s:
            continue
        i = j if layers is None else layers[j]
        held = (f"{s} KV heads" if all(x == s for x in stored)
                else f"{s} KV heads in layer {i}")
        want = (f"kv_heads {uniform}" if uniform is not None and layers is None
                else f"{g} KV heads in {'layer' if layers is None else 'output layer'} "
                     f"{i if layers is None else j}")
        raise TierError(f"{holder} stores {held}; {want} needs {g} — {remedy}")


def uniform_kv_heads(kv_heads: Sequence[int]) -> int | None:
    """The common KV head count of every layer, or None when the layers differ."""
    hl = list(kv_heads)
    return hl[0] if hl and all(g == hl[0] for g in hl) else None


def describe_heads(kv_heads: Sequence[int]) -> str:
    """'2 KV heads', '1 KV head' or 'kv[4,4,2,2]'."""
    g = uniform_kv_heads(kv_heads)
    if g is not None:
        return f"{g} KV head" + ("s" if g != 1 else "")
    return "kv[" + ",".join(str(h) for h in kv_heads) + "]"


# ---- one width request: the five keywords as one value ------------------------------------------


FFN_KEYWORDS = ("tier", "layer_tiers", "widths")
HEAD_KEYWORDS = ("kv_heads", "layer_kv_heads")


class NestedShape(Protocol):
    """What `WidthRequest.resolve` reads of a config (both families' configs have it)."""

    @property
    def base(self) -> int: ...
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def layer_widths(self) -> list[int]: ...
    @property
    def base_kv_heads(self) -> int: ...
    @property
    def layer_kv_heads(self) -> list[int]: ...


class Setting(NamedTuple):
    """A resolved request: one FFN width and one KV head count per layer."""

    widths: list[int]
    kv_heads: list[int]

    def keywords(self) -> dict[str, list[int]]:
        """As `set_widths` keywords (`widths`, `layer_kv_heads`)."""
        return {"widths": list(self.widths), "layer_kv_heads": list(self.kv_heads)}


def _int_tuple(value: Sequence[int] | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise TierError(f"{name} must be a list of integers, got {value!r}")
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise TierError(f"{name} must be a list of integers, got {value!r}") from None


@dataclass(frozen=True)
class WidthRequest:
    """One request for a setting of the two elastic axes, as one frozen value.

    FFN axis: at most one of `tier` (uniform), `layer_tiers` (one tier per layer), `widths` (one
    absolute width per layer, or one int for every layer). Head axis: at most one of `kv_heads`
    (every layer) or `layer_kv_heads` (one count per layer). An axis not named means "as stored"
    to `resolve` (and "as the model runs now" to a call that runs at a width for one call).
    Sequences are kept as tuples, so a request is hashable and cannot change after its check."""

    tier: int | None = None
    layer_tiers: tuple[int, ...] | None = None
    widths: int | tuple[int, ...] | None = None
    kv_heads: int | None = None
    layer_kv_heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        ffn = [k for k in FFN_KEYWORDS if getattr(self, k) is not None]
        if len(ffn) > 1:
            # the message resolve_widths has always given
            raise TierError(f"give exactly one of tier, layer_tiers, widths (got {ffn})")
        if self.kv_heads is not None and self.layer_kv_heads is not None:
            raise TierError("give kv_heads or layer_kv_heads, not both")
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "layer_tiers", _int_tuple(self.layer_tiers, "layer_tiers"))
        set_(self, "layer_kv_heads", _int_tuple(self.layer_kv_heads, "layer_kv_heads"))
        if self.widths is not None and not isinstance(self.widths, int):
            set_(self, "widths", _int_tuple(self.widths, "widths"))

    @classmethod
    def of(cls, request: WidthRequest | None = None, **keywords: Any) -> WidthRequest:
        """`request` as it is, or a request built from the five keywords (the public door);
        giving both is an error."""
        if request is not None:
            if any(v is not None for v in keywords.values()):
                raise TierError("give a WidthRequest or width keywords, not both")
            return request
        return cls(**keywords)

    @property
    def names_ffn(self) -> bool:
        """Whether the FFN axis is named."""
        return any(getattr(self, k) is not None for k in FFN_KEYWORDS)

    @property
    def names_heads(self) -> bool:
        """Whether the head axis is named."""
        return self.kv_heads is not None or self.layer_kv_heads is not None

    def __bool__(self) -> bool:
        """False for the empty request (nothing named: as stored / as now)."""
        return self.names_ffn or self.names_heads

    def keywords(self) -> dict[str, Any]:
        """The keywords given (lists for sequences), e.g. to pass to a public function."""
        out: dict[str, Any] = {}
        for k in (*FFN_KEYWORDS, *HEAD_KEYWORDS):
            v = getattr(self, k)
            if v is not None:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def ffn(self) -> WidthRequest:
        """The FFN half of this request (heads dropped)."""
        return WidthRequest(tier=self.tier, layer_tiers=self.layer_tiers, widths=self.widths)

    def heads(self) -> WidthRequest:
        """The head half of this request (FFN dropped)."""
        return WidthRequest(kv_heads=self.kv_heads, layer_kv_heads=self.layer_kv_heads)

    def pick(self) -> tuple[int | None, int | None]:
        """(tier, widest width) naming what a multi-tier repo must hold for this request: the
        tier, the widest of `layer_tiers` (the smallest tier), or the widest of `widths`."""
        if self.layer_tiers:
            return min(self.layer_tiers), None
        if self.widths is not None:
            w = self.widths if isinstance(self.widths, int) else max(self.widths, default=0)
            return self.tier, int(w)
        return self.tier, None

    def resolve_ffn(self, base: int, num_layers: int) -> list[int] | None:
        """Per-layer widths of the FFN axis (arithmetic only, nothing held is checked); None
        when the axis is not named."""
        if not self.names_ffn:
            return None
        return resolve_widths(base, num_layers, tier=self.tier, layer_tiers=self.layer_tiers,
                              widths=self.widths)

    def resolve_heads(self, base_kv_heads: int, num_layers: int) -> list[int] | None:
        """Per-layer KV heads of the head axis (nothing held is checked); None when not named."""
        if not self.names_heads:
            return None
        return resolve_kv_heads(base_kv_heads, num_layers, kv_heads=self.kv_heads,
                                layer_kv_heads=self.layer_kv_heads)

    def resolve_against(self, base: int, stored_widths: Sequence[int], base_kv_heads: int,
                        stored_kv_heads: Sequence[int], *, holder: str = "this model",
                        remedy: str = "load the full checkpoint",
                        heads_remedy: str | None = None) -> Setting:
        """`resolve` for what stores `stored_widths` / `stored_kv_heads` (a model, a config):
        each named axis validated and checked to be held (the one "stores X, needs width Y"
        TierError, naming `holder` and `remedy`); an axis not named is as stored."""
        n = len(stored_widths)
        ws = self.resolve_ffn(base, n)
        if ws is None:
            ws = list(stored_widths)
        else:
            check_held(base, stored_widths, ws, tier=self.tier, holder=holder, remedy=remedy)
        hl = self.resolve_heads(base_kv_heads, n)
        if hl is None:
            hl = list(stored_kv_heads)
        else:
            check_heads_held(stored_kv_heads, hl, uniform=self.kv_heads, holder=holder,
                             remedy=heads_remedy or remedy)
        return Setting(ws, hl)

    def resolve(self, config: NestedShape, *, holder: str = "this model",
                remedy: str = "load the full checkpoint",
                heads_remedy: str | None = None) -> Setting:
        """This request checked once against `config`: (per-layer widths, per-layer KV heads),
        an axis not named as the config stores it; a width or head count the config does not
        hold is a TierError naming `holder` and what to do (`remedy`)."""
        return self.resolve_against(config.base, config.layer_widths, config.base_kv_heads,
                                    config.layer_kv_heads, holder=holder, remedy=remedy,
                                    heads_remedy=heads_remedy)

    def describe(self) -> str:
        """The request as its keywords, e.g. 'tier=2, kv_heads=1' (or 'as stored')."""
        return ", ".join(f"{k}={v}" for k, v in self.keywords().items()) or "as stored"
