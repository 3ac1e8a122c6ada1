"""This rank's micro-batches, read ahead so that data loading never shows in step time.

The position in the data (`data.WindowSampler`: epoch and index) stays in the training process:
it draws the token offsets of each global batch and keeps this rank's share; a `DataLoader`
(worker processes, pinned memory) reads the windows at those offsets from the token stream (an
in-memory array or a memory-mapped prepared token file) ahead of the step that uses them. The
position saved in a checkpoint is the one after the last batch *consumed*, not the read-ahead
one, so a resumed run reads exactly the batches an uninterrupted run would. The loader has a
generator of its own: its iterator draws a worker base seed when it starts (once per process),
which from the global generator would leave a resumed run's RNG two draws ahead of an
uninterrupted run's (the state every checkpoint saves).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from matformer.data.text import WindowSampler


class _Windows(Dataset):
    """Windows by token offset; a batch of offsets is read at once (`__getitems__`)."""

    def __init__(self, sampler: WindowSampler) -> None:
        self.sampler = sampler

    def __getitem__(self, start: int) -> torch.Tensor:
        return self.__getitems__([start])[0]

    def __getitems__(self, starts: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.sampler.read(np.asarray(starts, dtype=np.int64)))


def _as_is(batch: torch.Tensor) -> torch.Tensor:
    return batch


class Batches:
    """`next()` -> this rank's next (batch_size, seq_len) int64 batch on `device`;
    `position` -> the data position after the last batch returned."""

    def __init__(self, sampler: WindowSampler, rank: int, world: int, batch_size: int,
                 device: torch.device, workers: int) -> None:
        self.sampler, self.rank, self.world, self.B = sampler, rank, world, batch_size
        self.device, self.workers = device, workers
        self.position: dict[str, Any] = sampler.state()
        self._ahead: deque[dict[str, Any]] = deque()
        self._it: Iterator[torch.Tensor] | None = None

    def _offsets(self) -> Iterator[list[int]]:
        while True:
            starts = self.sampler.starts(self.world * self.B)
            self._ahead.append(self.sampler.state())
            yield starts[self.rank * self.B:(self.rank + 1) * self.B].tolist()

    def next(self) -> torch.Tensor:
        if self._it is None:  # after a resume restored the sampler's position
            self.position = self.sampler.state()
            loader = DataLoader(_Windows(self.sampler), batch_sampler=self._offsets(),
                                num_workers=self.workers, collate_fn=_as_is,
                                pin_memory=self.device.type == "cuda",
                                persistent_workers=self.workers > 0,
                                generator=torch.Generator())
            self._it = iter(loader)
        batch = next(self._it)
        self.position = self._ahead.popleft()
        return batch.to(self.device, non_blocking=True)

    def close(self) -> None:
        self._it = None  # shuts the workers down
