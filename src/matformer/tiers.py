"""Width and tier arithmetic: the one place that knows what "tier t" means.

Tier t of a model whose full (tier-0) FFN width is B is the width B >> t, defined only when B is
divisible by 2**t. A per-layer list of widths (Mix'n'Match) may mix tiers, or hold widths that
are no tier at all; such a list has no uniform tier.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import TierError


def width_of(base: int, tier: int) -> int:
    """Width of tier `tier` for base width `base`: base >> tier, exact or an error."""
    if isinstance(tier, bool) or not isinstance(tier, int) or tier < 0:
        raise TierError(f"tier must be a non-negative integer, got {tier!r}")
    if base <= 0:
        raise TierError(f"base width must be positive, got {base}")
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


def available_tiers(base: int, stored: int | Sequence[int], limit: int = 4) -> list[int]:
    """Tiers (at most `limit` of them, counted from tier 0) that a model storing `stored` widths
    can run by runtime slicing: those whose width fits within every stored layer width."""
    stored_list = [stored] if isinstance(stored, int) else list(stored)
    smallest = min(stored_list)
    return [t for t in range(min(max_tier(base), limit - 1) + 1) if (base >> t) <= smallest]


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
    tiers: Sequence[int] | None = None,
    widths: int | Sequence[int] | None = None,
) -> list[int]:
    """Turn exactly one of a tier, a per-layer list of tiers, or a width (per layer or uniform)
    into a validated per-layer width list (widths are absolute: relative to `base`)."""
    given = [name for name, v in (("tier", tier), ("tiers", tiers), ("widths", widths)) if v is not None]
    if len(given) != 1:
        raise TierError(f"give exactly one of tier, tiers, widths (got {given or 'none'})")
    if tier is not None:
        return [width_of(base, tier)] * num_layers
    if tiers is not None:
        tl = list(tiers)
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


def parse_int_list(text: str, what: str = "list") -> list[int]:
    """Parse '1,2,3' (the CLI's list syntax) into ints, with an error naming `what`."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise TierError(f"{what} must be comma-separated integers, got {text!r}") from None


def describe_widths(base: int, widths: Sequence[int]) -> str:
    """Short human description: 'tier 2 (width 256)' or 'mix [512,512,256,...]'."""
    t = uniform_tier(base, widths)
    if t is not None:
        return f"tier {t} (width {widths[0]})"
    return "mix[" + ",".join(str(w) for w in widths) + "]"
