"""Tier arithmetic: the one definition of what tier t means."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from matformer.errors import TierError
from matformer.models.lm.config import MatFormerConfig
from matformer.tiers import (
    Setting,
    WidthRequest,
    check_held,
    least_slope_plan,
    least_slope_plans,
    max_tier,
    mix_n_match_plans,
    parse_int_list,
    resolve_widths,
    runnable_tiers,
    tier_of,
    uniform_tier,
    width_of,
)


def test_width_of_and_tier_of_examples() -> None:
    assert width_of(4096, 0) == 4096
    assert width_of(4096, 3) == 512
    assert tier_of(4096, 512) == 3
    assert tier_of(4096, 4096) == 0
    assert tier_of(4096, 3072) is None  # 4/3 is no power of two
    assert tier_of(4096, 8192) is None  # wider than the base
    assert tier_of(4096, 0) is None
    assert tier_of(1536, 512) is None  # ratio 3
    with pytest.raises(TierError, match="divisible by 2\\^3"):
        width_of(100, 3)
    with pytest.raises(TierError, match="non-negative"):
        width_of(100, -1)


@given(st.integers(1, 1 << 20), st.integers(0, 12))
def test_width_and_tier_are_inverse(base: int, tier: int) -> None:
    if base % (1 << tier) == 0:
        assert tier_of(base, width_of(base, tier)) == tier
        assert tier <= max_tier(base)
    else:
        with pytest.raises(TierError):
            width_of(base, tier)
        assert tier > max_tier(base)


def test_uniform_tier_and_runnable_tiers() -> None:
    assert uniform_tier(256, [64, 64, 64]) == 2
    assert uniform_tier(256, [64, 128]) is None
    assert uniform_tier(256, 256) == 0
    assert runnable_tiers(256, 256, limit=4) == [0, 1, 2, 3]
    assert runnable_tiers(256, 256) == list(range(9))  # no limit: down to width 1
    assert runnable_tiers(256, 64, limit=4) == [2, 3]
    assert runnable_tiers(256, [256, 64], limit=4) == [2, 3]
    assert runnable_tiers(12, 12) == [0, 1, 2]  # 12 -> 6 -> 3, then not divisible


def test_resolve_widths_forms() -> None:
    assert resolve_widths(256, 3, tier=1) == [128, 128, 128]
    assert resolve_widths(256, 3, layer_tiers=[3, 2, 0]) == [32, 64, 256]
    assert resolve_widths(256, 3, widths=100) == [100, 100, 100]
    assert resolve_widths(256, 2, widths=[10, 256]) == [10, 256]
    with pytest.raises(TierError, match="3 layers"):
        resolve_widths(256, 3, layer_tiers=[1, 1])
    with pytest.raises(TierError, match="layer 1"):
        resolve_widths(256, 2, widths=[10, 300])
    with pytest.raises(TierError, match="exactly one"):
        resolve_widths(256, 2)


def test_parse_int_list() -> None:
    assert parse_int_list("3, 3,2,1") == [3, 3, 2, 1]
    with pytest.raises(TierError, match="--layer-tiers"):
        parse_int_list("3,a", "--layer-tiers")


def test_check_held_is_the_one_stores_needs_error() -> None:
    check_held(256, [64, 64], [64, 32])  # narrowing is always fine
    with pytest.raises(TierError, match=r"^this model stores tier 2, width 64; tier 1 needs width "
                                        r"128 — load the full checkpoint \(base width 256\)$"):
        check_held(256, [64, 64], [128, 128], tier=1)
    with pytest.raises(TierError, match="stores width 64 in layer 1; tier 0 \\(layer 1\\) needs width 256"):
        check_held(256, [256, 64], [256, 256])
    # An extraction that dropped layer 0: the entry is named as an output layer.
    with pytest.raises(TierError, match="^the source stores .*tier 1 \\(output layer 0\\) needs "
                                        "width 128 — slice from it"):
        check_held(256, [64, 64], [128, 64], holder="the source", remedy="slice from it",
                   layers=[1, 2])


def test_least_slope_plans() -> None:
    assert least_slope_plan(64, 128, 4, 1) == [64, 64, 64, 128]
    plans = least_slope_plans([128, 64, 256], 2)  # pairs (64, 128), (128, 256); k = 0..2
    assert plans == [[64, 64], [64, 128], [128, 128], [128, 128], [128, 256], [256, 256]]
    with pytest.raises(TierError):
        least_slope_plan(64, 128, 4, 5)
    mixes = mix_n_match_plans(1024, 8, [0, 1, 2])
    assert len(mixes) == 6 and [512] * 6 + [1024] * 2 in mixes


# ---- WidthRequest: the five keywords as one value ------------------------------------------------


def _cfg(**kw: object) -> MatFormerConfig:
    """A 2-layer debug config (base width 256, 4 KV heads) storing what `kw` says."""
    return MatFormerConfig.from_preset("debug", **kw)


def test_width_request_is_one_frozen_hashable_value() -> None:
    r = WidthRequest(layer_tiers=[1, 0], layer_kv_heads=[2, 4])
    assert r.layer_tiers == (1, 0) and r.layer_kv_heads == (2, 4)  # lists become tuples
    assert r == WidthRequest(layer_tiers=(1, 0), layer_kv_heads=(2, 4))
    assert len({r, WidthRequest(layer_tiers=[1, 0], layer_kv_heads=[2, 4])}) == 1
    with pytest.raises(AttributeError):
        r.tier = 2  # type: ignore[misc]
    assert WidthRequest(widths=[5, 6]).widths == (5, 6) and WidthRequest(widths=7).widths == 7
    assert not WidthRequest() and WidthRequest(kv_heads=1) and WidthRequest(tier=0)
    assert r.keywords() == {"layer_tiers": [1, 0], "layer_kv_heads": [2, 4]}
    assert r.ffn() == WidthRequest(layer_tiers=[1, 0]) and r.heads() == WidthRequest(
        layer_kv_heads=[2, 4])
    assert r.names_ffn and r.names_heads and not r.ffn().names_heads
    assert r.describe() == "layer_tiers=[1, 0], layer_kv_heads=[2, 4]"
    assert WidthRequest().describe() == "as stored"


def test_width_request_allows_one_keyword_per_axis() -> None:
    with pytest.raises(TierError, match="exactly one of tier, layer_tiers, widths"):
        WidthRequest(tier=1, widths=128)
    with pytest.raises(TierError, match="exactly one of tier, layer_tiers, widths"):
        WidthRequest(tier=1, layer_tiers=[1, 1])
    with pytest.raises(TierError, match="kv_heads or layer_kv_heads, not both"):
        WidthRequest(kv_heads=1, layer_kv_heads=[1, 1])
    with pytest.raises(TierError, match="list of integers"):
        WidthRequest(layer_tiers="12")  # type: ignore[arg-type]
    assert WidthRequest(tier=1, kv_heads=2).keywords() == {"tier": 1, "kv_heads": 2}
    assert WidthRequest.of(None, tier=1) == WidthRequest(tier=1)
    assert WidthRequest.of(WidthRequest(tier=2)) == WidthRequest(tier=2)
    with pytest.raises(TierError, match="not both"):
        WidthRequest.of(WidthRequest(tier=2), tier=1)


def test_width_request_resolves_against_a_config() -> None:
    cfg = _cfg()
    base, heads = cfg.base, cfg.base_kv_heads
    assert WidthRequest().resolve(cfg) == Setting([base] * 2, [heads] * 2)
    assert WidthRequest(tier=1).resolve(cfg) == Setting([base // 2] * 2, [heads] * 2)
    assert WidthRequest(layer_tiers=[2, 0], kv_heads=1).resolve(cfg) == (
        [base // 4, base], [1, 1])
    assert WidthRequest(widths=100, layer_kv_heads=[1, 2]).resolve(cfg).keywords() == {
        "widths": [100, 100], "layer_kv_heads": [1, 2]}
    with pytest.raises(TierError, match="3 per-layer tiers for a model of 2 layers"):
        WidthRequest(layer_tiers=[0, 0, 0]).resolve(cfg)
    with pytest.raises(TierError, match=rf"KV head count 9 of layer 0 is outside 1\.\.{heads}"):
        WidthRequest(kv_heads=9).resolve(cfg)
    assert WidthRequest(tier=1).pick() == (1, None)
    assert WidthRequest(layer_tiers=[3, 1, 2]).pick() == (1, None)
    assert WidthRequest(widths=[64, 128]).pick() == (None, 128)
    assert WidthRequest(kv_heads=1).pick() == (None, None)


def test_width_request_is_checked_against_what_is_stored() -> None:
    """A config storing tier 1 and 1 KV head: the one "stores X, needs width Y" error, naming
    the holder and the remedy given."""
    cfg = _cfg().with_widths([_cfg().base // 2] * 2).with_kv_heads(1)
    half = cfg.base // 2
    assert WidthRequest(tier=2).resolve(cfg).widths == [half // 2] * 2
    with pytest.raises(TierError, match=rf"CKPT stores tier 1, width {half}; tier 0 needs width "
                                        rf"{2 * half} — get the full one"):
        WidthRequest(tier=0).resolve(cfg, holder="CKPT", remedy="get the full one")
    with pytest.raises(TierError, match=r"stores 1 KV heads; kv_heads 2 needs 2 — load more"):
        WidthRequest(kv_heads=2).resolve(cfg, heads_remedy="load more")
    with pytest.raises(TierError, match="layer 1"):
        WidthRequest(layer_tiers=[1, 0]).resolve(cfg)
