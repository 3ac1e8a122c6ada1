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

The global gradient norm (clipping, the float16 overflow test) is `grad_norm`: defined on the
FSDP2 shard layout of the run's world size whichever wrapper holds the gradients, so DDP and
FSDP2 runs on the same number of processes clip by the same number, bit for bit (a run resumed
in the other mode continues the uninterrupted one exactly; see docs/TRAINING.md, "Sharded
resume").
"""

from __future__ import annotations

import gc
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
    never reach it.

    Before the group goes, a garbage collection: FSDP2's parameters (DTensors holding the device
    mesh, hence the group) sit in reference cycles after the body returns (21 of them on the
    debug model), so without it they are freed by a later collection or at interpreter exit,
    after `destroy_process_group`, where freeing gloo's work objects aborts the process (the
    same "terminate called without an active exception")."""
    dist = setup(device)
    try:
        out = body(dist)
        gc.collect()
        barrier(dist)
        return out
    finally:
        gc.collect()
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
    dims = {id(p): nested_dim(name) for name, p in model.named_parameters()}

    def placement(p: nn.Parameter) -> Shard:
        return Shard(shard_dim(p.ndim, dims.get(id(p))))

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model


def shard_dim(ndim: int, nested: int | None) -> int:
    """The dimension FSDP2 shards a parameter along: the other one of a nested matrix (each
    rank's shard then holds whole neurons), dimension 0 otherwise. `grad_norm` reads the same
    rule, so a DDP run measures its gradients in the pieces an FSDP2 run would hold."""
    return 1 - nested if nested is not None and ndim == 2 else 0


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and 64-byte aligned (a copy only when it is not): a reduction kernel then
    sees a piece the same way however it was laid out in memory (a strided column block of a
    whole gradient, an FSDP2 shard at some offset of its reduce-scatter buffer)."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def grad_norm(grads: list[torch.Tensor], dims: list[int], dist: Dist) -> torch.Tensor:
    """The global L2 norm of `grads` (float32, 0-dim, on the gradients' device), computed in one
    order that does not depend on how they are held: each gradient cut into `world` pieces along
    its shard dimension `dims[i]` (torch.chunk's pieces, FSDP2's shards), the norm of each piece,
    then the norm of those `len(grads) * world` numbers, gradient by gradient and piece by piece.

    Why not `clip_grad_norm_`'s own: over whole tensors (DDP) and over shards combined by the
    DTensor reduction (FSDP2) it sums the squares in different orders, so the two clip by norms
    one rounding step apart and a run resumed in the other mode drifts from the uninterrupted
    one by that much at every clipped step. Here an FSDP2 rank takes the norm of its own shard
    and one all-gather of those numbers completes the table; a DDP rank (replicated gradients)
    computes the whole table itself. In one process (`world` 1) a piece is the whole gradient:
    the norm `clip_grad_norm_` computes, bit for bit."""
    from torch.distributed.tensor import DTensor

    if not grads:
        return torch.zeros((), device=dist.device)
    if isinstance(grads[0], DTensor):
        mesh = grads[0].device_mesh
        local = torch.stack([torch.linalg.vector_norm(_canonical(g.to_local())).float()
                             for g in grads])
        world = mesh.size()
        if world > 1:
            pieces = [torch.empty_like(local) for _ in range(world)]
            torch.distributed.all_gather(pieces, local, group=mesh.get_group())
            local = torch.stack(pieces, dim=1)  # [gradient, piece]
        return torch.linalg.vector_norm(local.flatten())
    table = []
    for g, dim in zip(grads, dims, strict=True):
        pieces = list(torch.chunk(g, dist.world, dim)) if dist.world > 1 else [g]
        norms = [torch.linalg.vector_norm(_canonical(c)).float() for c in pieces]
        zero = torch.zeros((), device=g.device)  # FSDP2's empty shards (dimension < world)
        table.append(torch.stack(norms + [zero] * (dist.world - len(norms))))
    return torch.linalg.vector_norm(torch.stack(table).flatten())


def clip_grads(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` in place as `clip_grad_norm_` does given the global `norm` (coefficient
    max_norm / (norm + 1e-6), at most 1); an FSDP2 gradient scales its own shard."""
    from torch.distributed.tensor import DTensor

    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if local:
        torch._foreach_mul_(local, coef.to(local[0].device))


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
