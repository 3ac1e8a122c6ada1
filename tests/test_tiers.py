"""Tier arithmetic: the one definition of what tier t means."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from matformer.errors import TierError
from matformer.tiers import (
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
