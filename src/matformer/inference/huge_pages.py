"""A model's CPU weights moved onto transparent huge pages, for decoding.

A batch-1 decoding step on a CPU reads every weight once per token: its speed is the rate at
which the weights stream from memory. On 4 KB pages that stream also walks the page tables (a
TLB miss every 4 KB); on 2 MB huge pages it does not. On this project's development CPU (AMD
EPYC, 1 thread) the compiled step of the 41.7M benchmark model, with weights freshly allocated
by PyTorch (4 KB pages: a random initialisation, a dtype conversion, a dequantized GGUF), took
11-12 ms; the same weights on huge pages, 8.5 ms (docs/INFERENCE.md). Weights that
`load_model` maps from a safetensors file are on whatever pages the page cache gives, which
depends on the file system.

`weights_on_huge_pages` copies every CPU parameter and buffer of a model into one anonymous
mapping aligned to 2 MB and advised `MADV_HUGEPAGE` (Linux's transparent huge pages in their
default `madvise` mode), and points the tensors at it. PyTorch's own switch for this
(`THP_MEM_ALLOC_ENABLE=1`) is read once per process before the first allocation, so a library
cannot turn it on for the weights it decodes with. Values, dtypes, shapes, tied weights and the
`Parameter` objects themselves are unchanged; only where the bytes live moves. Idempotent (a
second call finds the tensors in place and copies nothing). Elsewhere (not Linux, no THP, THP
set to `never`, `MATFORMER_HUGE_PAGES=0`) it does nothing, and it leaves a model alone whose
weights exceed half the memory the system has available: the copy is anonymous memory, which
weights mapped from a file are not, so a model that fits only as a file mapping stays one.
"""

from __future__ import annotations

import mmap
import os
import sys
import weakref
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64
"""Each tensor starts on a cache line."""

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MEMINFO = Path("/proc/meminfo")

_PLACED: weakref.WeakKeyDictionary[nn.Module, frozenset[int]] = weakref.WeakKeyDictionary()
"""Per model, the data pointers its tensors had once placed (a second call checks them)."""


def huge_pages_available() -> bool:
    """Transparent huge pages can back an advised mapping here (and are not switched off by
    `MATFORMER_HUGE_PAGES=0`)."""
    if os.environ.get("MATFORMER_HUGE_PAGES", "1") == "0":
        return False
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting


def available_bytes() -> int | None:
    """The memory the system says is available (`MemAvailable`), or None if unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's CPU parameters and buffers that own their storage alone (a tensor sharing
    its storage with another one, or a view into a larger one, is left where it is)."""
    seen: dict[int, list[torch.Tensor]] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.numel() > 0 and not t.is_sparse:
            seen.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    out = []
    for group in seen.values():
        t = group[0]
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.untyped_storage().nbytes() == t.numel() * t.element_size())
        if len(group) == 1 and whole:
            out.append(t)
    return out


def weights_on_huge_pages(model: nn.Module) -> int:
    """Move `model`'s CPU weights onto one huge-page mapping (see the module's docstring);
    returns the bytes moved (0 when nothing was, or they were placed already)."""
    if not huge_pages_available():
        return 0
    tensors = _tensors(model)
    if not tensors:
        return 0
    placed = _PLACED.get(model)
    if placed is not None and {t.data_ptr() for t in tensors} <= placed:
        return 0
    offsets, total = _layout(tensors)
    free = available_bytes()
    if free is None or 2 * total > free:
        return 0
    with torch.no_grad():
        for t, home in zip(tensors, _homes(tensors, offsets, total), strict=True):
            home.copy_(t)
            t.data = home
    _PLACED[model] = frozenset(t.data_ptr() for t in tensors)
    return total


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's byte offset, one after the other from cache-line starts, and the bytes in
    all."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return offsets, total


def _homes(tensors: list[torch.Tensor], offsets: list[int], total: int) -> list[torch.Tensor]:
    """Empty contiguous tensors shaped as `tensors`, at `offsets` in one new huge-page mapping
    of `total` bytes (each a view keeping the mapping alive)."""
    # private (a shared anonymous mapping is shmem, which THP's `enabled` does not cover), and
    # whole 2 MB pages from an aligned start
    size = -(-total // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(area, dtype=torch.uint8)  # keeps `area` alive while any view is
    start = -raw.data_ptr() % HUGE_PAGE
    return [raw[start + off:start + off + t.numel() * t.element_size()].view(t.dtype)
            .view(t.shape) for t, off in zip(tensors, offsets, strict=True)]


def contiguous_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of `tensors` (CPU), laid one after the other on one huge-page mapping
    where huge pages are available (else ordinary contiguous copies): for a decoding step that
    reads them in this order."""
    if not tensors:
        return []
    offsets, total = _layout(tensors)
    free = available_bytes()
    if not huge_pages_available() or free is None or 2 * total > free:
        return [t.clone(memory_format=torch.contiguous_format) for t in tensors]
    homes = _homes(tensors, offsets, total)
    with torch.no_grad():
        for t, home in zip(tensors, homes, strict=True):
            home.copy_(t)
    return homes
