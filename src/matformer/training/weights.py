"""The model's Hugging Face checkpoint (config.json + safetensors), written from plain or
FSDP2-sharded parameters, in the dtype the user asked for (`--save-dtype`).

Sharded parameters are never materialised whole on one rank: the writer (io.checkpoint's
`write_checkpoint`, on rank 0) asks for one tensor at a time; each request is one
`DTensor.full_tensor()` (an all-gather of that tensor only) that every rank joins in the same
order, so the peak extra memory is the largest single tensor. Rank 0 streams it into the
safetensors shards and writes the index; the other ranks drop their copy. (All-gather rather
than gather-to-0: it is the collective DTensor has, and one tensor at a time it costs no more.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from matformer.io.checkpoint import write_checkpoint
from matformer.io.safetensors import st_dtype
from matformer.training.distributed import Dist, broadcast_str
from matformer.training.precision import compute_dtype


def write_model(model: nn.Module, out_dir: Path, files: Mapping[str, bytes],
                save_dtype: str = "float32", dist: Dist | None = None,
                sharded: bool = False) -> Path | None:
    """Write `out_dir` (rank 0; atomically, as every checkpoint). Collective when `sharded`:
    every rank calls it; otherwise only rank 0 does."""
    config = model.config.with_widths(model.stored_widths)
    sd = model.state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    dtype = compute_dtype(save_dtype)
    specs = [(k, st_dtype(dtype if v.is_floating_point() else v.dtype), tuple(v.shape))
             for k, v in sd.items()]
    names, produced = [s[0] for s in specs], set()

    def produce(name: str) -> torch.Tensor:
        produced.add(name)
        t = sd[name]
        t = t.full_tensor() if isinstance(t, DTensor) else t
        return t.detach().to(dtype) if t.is_floating_point() else t.detach()

    if not sharded or dist is None:
        return write_checkpoint(out_dir, config, specs, produce, extra_files=files)
    error, path = None, None
    if dist.main:
        try:
            path = write_checkpoint(out_dir, config, specs, produce, extra_files=files)
        except Exception as e:  # finish the collectives, then every rank raises
            error = e
    for name in names:  # the other ranks' share of the all-gathers (rank 0: any it skipped)
        if name not in produced:
            produce(name)
    failure = broadcast_str(repr(error) if error else "", dist)
    if failure and error is None:
        raise RuntimeError(f"rank 0 could not write {out_dir}: {failure}")
    if error is not None:
        raise error
    return path
