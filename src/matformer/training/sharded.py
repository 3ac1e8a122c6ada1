"""Sharded training state through `torch.distributed.checkpoint` (DCP), for `--fsdp` runs.

A checkpoint `OUT/checkpoints/step-NNNNNNN/` of an FSDP2 run holds the usual Hugging Face model
(written from the shards by `weights.write_model`), the tokenizer, train_config.json, and:
- `training_state/`: a DCP folder (`.metadata` + one `.distcp` file per rank) with the float32
  parameters, NestedAdamW's moments (sharded like the parameters) and per-neuron step counts
  (replicated: written once), and rank 0's RNG state;
- `training_state.json`: step, data position, tokens seen, world size, lr, history, loss scale.

DCP records every tensor by its global offsets, so a run can resume with any number of
processes (it reshards on load); with the same number the result is bit-identical to an
uninterrupted run. A run resumed without --fsdp reads the same folder into whole tensors, and an
--fsdp run resumed from a single-file state (state.restore) takes its shard of each tensor
(`like`); either way the next checkpoint is in the format of the resumed run. The DCP folder is
written first into `.step-NNNNNNN.dcp/` beside the checkpoints and moved into the finished model
folder last: a checkpoint counts as complete only once `training_state/.metadata` is in it
(`state.checkpoints`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from matformer.errors import CheckpointError
from matformer.io.atomic import atomic_write, fsync_dir
from matformer.io.metadata import read_json
from matformer.training.distributed import Dist, barrier
from matformer.training.optimizer import NestedAdamW

STATE_DIR = "training_state"
META_FILE = "training_state.json"


def is_sharded(folder: Path) -> bool:
    return (folder / STATE_DIR / ".metadata").is_file() and (folder / META_FILE).is_file()


def _state(model: nn.Module, opt: NestedAdamW, for_load: bool) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_for_dcp(for_load),
            "rng": torch.get_rng_state()}


def save_state(root: Path, step_name: str, model: nn.Module, opt: NestedAdamW, dist: Dist) -> Path:
    """Every rank writes its shards into `root/.{step_name}.dcp` (collective); returns it."""
    tmp = root / f".{step_name}.dcp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        root.mkdir(parents=True, exist_ok=True)
    barrier(dist)
    dcp.save(_state(model, opt, for_load=False), checkpoint_id=str(tmp))
    barrier(dist)
    return tmp


def finish(tmp: Path, folder: Path, meta: dict[str, Any]) -> None:
    """Rank 0, after the model folder is written: the JSON state, then the DCP folder moved in
    (the step that makes the checkpoint complete)."""
    atomic_write(folder / META_FILE, json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, folder / STATE_DIR)
    fsync_dir(folder)


def read_meta(folder: Path) -> dict[str, Any]:
    """training_state.json as parsed JSON (its fields are checked by TrainingState.from_meta)."""
    meta = read_json(folder / META_FILE, CheckpointError, "training state")
    if not {"step", "data_position"} <= meta.keys():
        raise CheckpointError(f"{folder / META_FILE}: no training metadata")
    return meta


def load_state(folder: Path, model: nn.Module, opt: NestedAdamW) -> None:
    """Every rank reads its shards (resharded to this run's world size) in place (collective).
    A model that is not sharded (a run resumed without --fsdp) reads whole tensors; in one
    process without a process group DCP reads without collectives."""
    state = _state(model, opt, for_load=True)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder / STATE_DIR),
                     no_dist=not torch.distributed.is_initialized())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP raises several types, CheckpointException (a
        # BaseException) among them, for a truncated .metadata/.distcp or another model's state
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{folder / STATE_DIR}: cannot load the sharded training state "
                              f"({type(e).__name__}: {first}); is it from the same model? "
                              f"(the checkpoint was not changed)") from None
    opt.loaded_from_dcp()
    torch.set_rng_state(state["rng"])


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor `t` laid out as `ref`: a DTensor sharded as `ref` (each rank keeps its own
    shard, no communication) when `ref` is one (a single-file training state read into an
    --fsdp run), `t` itself otherwise."""
    if not isinstance(ref, DTensor):
        return t
    return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
