"""Processes and devices: one code path for 1 and N processes.

`setup(device)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), picks the device and
starts the process group (gloo on CPU, NCCL on GPU); `wrap(module, dist)` is the DDP wrapper of
the objective (the per-rank losses' gradients are averaged once per step); `shard(model, dist)`
is the FSDP2 path (`fully_shard` per decoder layer, then the root); the rest are the few
collectives the loop needs, no-ops in a single process.

FSDP2 and nested widths: each rank runs every layer (all ranks issue the same all-gathers and
reduce-scatters) at its own width, on views of the unsharded parameters. A nested matrix is
sharded along its *other* dimension (gate/up [I, H] by columns, down [H, I] by rows), so every
rank's shard holds all neurons of its slice and `NestedAdamW`'s prefix updates stay local.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from matformer.models.devices import check_device

T = TypeVar("T")


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
    check_device(device, allow_auto=True)
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
    if torch.distributed.is_initialized():  # also the group of one that `shard` starts
        torch.distributed.destroy_process_group()


def run_in_group(device: str, body: Callable[[Dist], T]) -> T:
    """`setup(device)`, `body(dist)`, then `teardown` however the body ends (both trainers).
    After a body that ended normally every rank first meets at a barrier: a rank that destroyed
    its gloo group while another was still printing its last lines could take the other's
    connection down under it (seen as "terminate called without an active exception", SIGABRT,
    on one rank of a finished 2-process run). After an exception no barrier: the other ranks may
    never reach it."""
    dist = setup(device)
    try:
        out = body(dist)
        barrier(dist)
        return out
    finally:
        teardown(dist)


def wrap(module: nn.Module, dist: Dist) -> nn.Module:
    """The module every rank runs: itself in one process, DDP-wrapped in several."""
    if dist.world == 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def shard(model: nn.Module, dist: Dist, nested_dim: Callable[[str], int | None]) -> nn.Module:
    """FSDP2 in place: `fully_shard` on every decoder layer, then on the root (embedding, final
    norm, lm_head). `nested_dim(name)` (NestedAdamW's) is the nested dimension of a parameter,
    None for plain ones; nested matrices are sharded along the other dimension. Works in one
    process too (a process group of one)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    if not torch.distributed.is_initialized():  # one process without torchrun
        store = torch.distributed.FileStore(tempfile.mktemp(prefix="matformer-pg-"), 1)
        torch.distributed.init_process_group("nccl" if dist.device.type == "cuda" else "gloo",
                                             store=store, rank=0, world_size=1)
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    dims = {id(p): d for name, p in model.named_parameters() if (d := nested_dim(name)) is not None}

    def placement(p: nn.Parameter) -> Shard:
        return Shard(1 - dims[id(p)]) if id(p) in dims else Shard(0)

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model


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
