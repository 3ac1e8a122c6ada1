"""The process-group lifetime of a training run (training/distributed.py)."""

from __future__ import annotations

import gc

import torch
from torch.distributed.tensor import DTensor

from matformer.training import distributed
from tests.conftest import tiny_lm


def _alive_dtensors() -> int:
    # type(), not isinstance: isinstance reads each object's `__class__`, and one of them
    # (`torch.distributed.reduce_op`) warns that it is deprecated when read
    return sum(1 for o in gc.get_objects() if issubclass(type(o), DTensor))


def test_no_sharded_parameter_outlives_the_process_group() -> None:
    """FSDP2's parameters sit in reference cycles after a run; `run_in_group` collects them
    while the group is alive, so none is freed after `destroy_process_group` (a gloo abort at
    interpreter exit when it happens there)."""
    gc.collect()
    before = _alive_dtensors()

    def body(dist: distributed.Dist) -> int:
        model = distributed.shard(tiny_lm(), dist, lambda name: None)
        return sum(1 for p in model.parameters() if isinstance(p, DTensor))

    gc.disable()  # only run_in_group's own collection may free them
    try:
        sharded = distributed.run_in_group("cpu", body)
        assert sharded > 0
        assert not torch.distributed.is_initialized()
        assert _alive_dtensors() == before
    finally:
        gc.enable()
