"""Training points: what one pass of a step trains — an FFN tier and, with nested attention heads
(issue 11), a KV head count.

Without heads in play a point is its tier, an int, exactly as before. With `--nest-heads`, or
runtime heads (`--kv-heads`, `--rank-kv-heads`), a point is a `Point(tier, kv_heads)`, written
"T/kvG" in log lines, train_log.jsonl, the history and train_summary.json (`parse_key` reads it
back).

Which pairs (docs/TRAINING.md): `--nest-heads` trains the grid of the trained tiers x the head
granularities G, G/2, ..., 1 (`tiers.head_granularities`). `sample` draws one pair per step, the
tier with `tier_probs` and the heads uniformly and independently (so every pair is drawn with
p_tier / H); `joint` sums every pair of the grid with weight `joint_weights[tier]` (T x H passes
a step). The grid rather than a pairing (tier i with G >> i, say) because every point `matformer
eval` reports is then a trained one, and no rule of which FFN goes with which heads has to be
justified. A runtime head count g (`--kv-heads g`) limits a rank to the pairs with at most g
heads (without --nest-heads: every tier at exactly g heads); only those heads are updated.

`update_extents` says which prefix of each nested parameter some rank's pass used this step:
rows of gate/up/q/k/v, columns of down/o. `NestedAdamW.step` consumes it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from matformer.errors import ConfigError, TierError
from matformer.models.lm.config import MatFormerConfig
from matformer.tiers import head_granularities
from matformer.training.settings import rank_choices, runtime_tiers


class Point(NamedTuple):
    """A trained (FFN tier, KV heads) pair."""

    tier: int
    kv_heads: int

    def __str__(self) -> str:
        return f"{self.tier}/kv{self.kv_heads}"


Key = int | Point
"""A trained point: a tier (no heads in play) or a Point."""


def heads_in_play(cfg: Any) -> bool:
    """Whether the run trains or limits heads (points are then `Point`s)."""
    return bool(getattr(cfg, "nest_heads", False)) or cfg.kv_heads is not None \
        or cfg.rank_kv_heads is not None


def tier_of_key(key: Key) -> int:
    return key.tier if isinstance(key, Point) else key


def setting_of(key: Key) -> dict[str, int]:
    """`set_widths` / `at_width` keywords of a point (the stored heads when it names none)."""
    if isinstance(key, Point):
        return {"tier": key.tier, "kv_heads": key.kv_heads}
    return {"tier": key}


def parse_key(text: str) -> Key:
    """'2' -> 2, '2/kv1' -> Point(2, 1) (what str(key) wrote)."""
    tier, sep, heads = str(text).partition("/kv")
    return Point(int(tier), int(heads)) if sep else int(tier)


def runtime_kv_heads(cfg: Any, world: int, kv_base: int) -> list[int]:
    """The runtime KV heads of every rank (default: all G)."""
    if cfg.rank_kv_heads is not None:
        if len(cfg.rank_kv_heads) != world:
            raise ConfigError(f"rank_kv_heads has {len(cfg.rank_kv_heads)} entries "
                              f"({cfg.rank_kv_heads}) but {world} process(es) are running; give "
                              f"one KV head count per rank")
        return list(cfg.rank_kv_heads)
    return [cfg.kv_heads if cfg.kv_heads is not None else kv_base] * world


def rank_heads(cfg: Any, kv_base: int, rg: int) -> list[int]:
    """The KV head counts a rank at runtime heads `rg` trains: the granularities <= rg with
    --nest-heads, else rg alone."""
    if not 0 < rg <= kv_base:
        raise TierError(f"runtime KV heads {rg} is outside 1..{kv_base} (the model's KV heads)")
    if not getattr(cfg, "nest_heads", False) or cfg.objective == "single":
        return [rg]
    return [g for g in head_granularities(kv_base) if g <= rg]


def rank_points(cfg: Any, tiers: list[int], probs: list[float], kv_base: int,
                rg: int) -> tuple[list[Key], list[float]]:
    """The rank's tiers with their probabilities/weights (settings.rank_choices) crossed with its
    head counts: sample probabilities p_tier / H, joint weights w_tier per pair."""
    if not heads_in_play(cfg):
        return list(tiers), list(probs)
    heads = rank_heads(cfg, kv_base, rg)
    share = 1.0 / len(heads) if cfg.objective == "sample" else 1.0
    return ([Point(t, g) for t in tiers for g in heads],
            [p * share for p in probs for _ in heads])


def validate_heads(cfg: Any, kv_base: int, world: int) -> None:
    """Head settings that can't run are a ConfigError/TierError naming the setting."""
    if cfg.kv_heads is not None and not 0 < cfg.kv_heads <= kv_base:
        raise TierError(f"kv_heads: {cfg.kv_heads} is outside 1..{kv_base} (the model has "
                        f"{kv_base} KV heads)")
    for g in runtime_kv_heads(cfg, world, kv_base):
        if not 0 < g <= kv_base:
            raise TierError(f"rank_kv_heads: {g} is outside 1..{kv_base} (the model has "
                            f"{kv_base} KV heads)")


def extents(model_cfg: MatFormerConfig, width: int, kv_heads: int | None) -> dict[str, int]:
    """Per nested parameter, by name, the prefix (rows of gate/up/q/k/v, columns of down/o) a
    pass at FFN `width` and `kv_heads` KV heads (None: all stored) uses."""
    hd, r = model_cfg.head_dim, model_cfg.group_size
    assert hd is not None
    out: dict[str, int] = {}
    for i, stored in enumerate(model_cfg.layer_kv_heads):
        g = stored if kv_heads is None else min(kv_heads, stored)
        pre = f"model.layers.{i}."
        for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            out[f"{pre}{name}.weight"] = width
        for name, n in (("q_proj", g * r * hd), ("k_proj", g * hd), ("v_proj", g * hd),
                        ("o_proj", g * r * hd)):
            out[f"{pre}self_attn.{name}.weight"] = n
    return out


def widest(keys: list[Key], base: int, model_cfg: MatFormerConfig) -> dict[str, int]:
    """Extents covering every point in `keys`: the widest FFN and the most heads any uses."""
    width = max(base >> tier_of_key(k) for k in keys)
    heads = [k.kv_heads for k in keys if isinstance(k, Point)]
    return extents(model_cfg, width, max(heads) if len(heads) == len(keys) else None)


def all_trained_points(cfg: Any, base: int, kv_base: int, world: int) -> list[Key]:
    """Every point some rank trains (what evaluation scores), sorted (tiers, then heads
    descending)."""
    keys: set[Key] = set()
    kv = runtime_kv_heads(cfg, world, kv_base)
    for rank, rt in enumerate(runtime_tiers(cfg, world)):
        tiers, probs = rank_choices(cfg, base, rt)
        keys.update(rank_points(cfg, tiers, probs, kv_base, kv[rank])[0])
    return sorted(keys, key=lambda k: (tier_of_key(k), -k.kv_heads if isinstance(k, Point) else 0))
