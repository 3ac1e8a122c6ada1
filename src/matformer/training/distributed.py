"""Processes and devices: one code path for 1 and N processes.

`setup(device)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), picks the device and
starts the process group (gloo on CPU, NCCL on GPU); `wrap(module, dist)` is the data-parallel
wrapper of the objective (DDP today: the per-rank losses' gradients are averaged once per step;
an FSDP2 path belongs here, beside it); the rest are the few collectives the loop needs, no-ops
in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 logs, evaluates and saves."""
        return self.rank == 0


def setup(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world,
                                             device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


def teardown(dist: Dist) -> None:
    if dist.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(module: nn.Module, dist: Dist) -> nn.Module:
    """The module every rank runs: itself in one process, DDP-wrapped in several."""
    if dist.world == 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def broadcast_str(text: str | None, dist: Dist) -> str:
    """Rank 0's string on every rank."""
    if dist.world > 1:
        obj = [text]
        torch.distributed.broadcast_object_list(obj, src=0)
        text = obj[0]
    assert text is not None
    return text


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The sum over ranks (on the CPU), `t` itself in one process."""
    if dist.world == 1:
        return t
    t = t.to(dist.device)
    torch.distributed.all_reduce(t)
    return t.cpu()


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()
