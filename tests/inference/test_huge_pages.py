"""A model's CPU weights moved onto huge pages for decoding (`matformer.inference.huge_pages`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from matformer.inference.huge_pages import huge_pages_available, weights_on_huge_pages


def _vma_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 48), nn.LayerNorm(48),
                      nn.Linear(48, 64, bias=False))
    m[3].weight = m[0].weight.__class__(torch.randn(64, 48))
    m.register_buffer("steps", torch.arange(5))
    m.register_buffer("view", m[2].weight.detach()[:3])  # shares the norm's storage
    return m


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here")
def test_weights_move_onto_one_advised_mapping_unchanged() -> None:
    m = _model()
    params = dict(m.named_parameters())
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    x = torch.arange(6).reshape(2, 3)
    out = m[3](m[2](m[1](m[0](x))))
    moved = weights_on_huge_pages(m)
    assert moved > 0
    assert dict(m.named_parameters()) == params  # the same Parameter objects
    for k, v in m.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert torch.equal(m[3](m[2](m[1](m[0](x)))), out)
    ptr = m[1].weight.data_ptr()
    assert _vma_flags(ptr).get("THPeligible") == "1"  # advised MADV_HUGEPAGE, 2 MB aligned
    assert weights_on_huge_pages(m) == 0  # in place already: nothing copied
    assert m[1].weight.data_ptr() == ptr
    m[1].weight.data.add_(1.0)  # writable, as before
    assert torch.equal(m[1].weight, before["1.weight"] + 1.0)


def test_tied_weights_stay_tied_and_shared_storage_stays_put() -> None:
    m = _model()
    m[3].weight = m[0].weight.__class__(torch.randn(64, 32))
    m[3].weight = m[0].weight  # tied, as an LM's head and embedding
    view_ptr, norm_ptr = m.view.data_ptr(), m[2].weight.data_ptr()
    weights_on_huge_pages(m)
    assert m[3].weight is m[0].weight
    # a view into another tensor's storage: both left alone
    assert m.view.data_ptr() == view_ptr and m[2].weight.data_ptr() == norm_ptr


def test_switched_off_it_moves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATFORMER_HUGE_PAGES", "0")
    m = _model()
    ptr = m[1].weight.data_ptr()
    assert not huge_pages_available()
    assert weights_on_huge_pages(m) == 0 and m[1].weight.data_ptr() == ptr


def test_weights_beyond_half_the_available_memory_stay_where_they_are(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from matformer.inference import huge_pages

    m = _model()
    ptr = m[1].weight.data_ptr()
    monkeypatch.setattr(huge_pages, "available_bytes", lambda: 2 * 4096)
    assert weights_on_huge_pages(m) == 0 and m[1].weight.data_ptr() == ptr
