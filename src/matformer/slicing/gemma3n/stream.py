"""Streaming a Gemma 3n slice: map every source tensor onto its output tensor, read only the
part it needs from the validated safetensors shard, write it, let it go.

What each tensor becomes (names under the text prefix; everything else, the vision and audio
towers included, is copied unchanged):
- `layers.N.*` of a skipped layer: dropped; of a kept layer: renamed to its new index, with
  every per-layer tensor (attention, AltUp, LAuReL, per-layer gate/projection, norms);
- `layers.N.mlp.{gate,up}_proj`: rows [:w] (one contiguous byte range); `down_proj`: columns
  [:w], read as one short run per row;
- `embed_tokens_per_layer` [V_pl, L*h_pl]: the column blocks of the kept layers;
- `per_layer_model_projection` [L*h_pl, H]: the row blocks of the kept layers.

Reading goes through `io.tensors.TensorReader` (column runs of the per-layer embedding table,
262_144 rows in a real model, are read in bounded chunks there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from matformer.errors import CheckpointError
from matformer.io.layout import Checkpoint
from matformer.io.tensors import ReadJob, merge_ranges
from matformer.slicing.gemma3n.config import Gemma3nConfig
from matformer.slicing.gemma3n.plan import Gemma3nPlan
from matformer.slicing.gemma3n.shapes import PER_LAYER_EMBEDDING, PER_LAYER_PROJECTION, text_shapes

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Job:
    """One output tensor: its name, dtype and shape, and what to read of which source tensor."""

    out_name: str
    dtype: str
    out_shape: tuple[int, ...]
    read: ReadJob


def _job(out_name: str, src: str, dtype: str, shape: tuple[int, ...],
         rows: Sequence[tuple[int, int]] | None = None,
         cols: Sequence[tuple[int, int]] | None = None) -> Job:
    read = ReadJob(src, None if rows is None else tuple(rows), None if cols is None else tuple(cols))
    return Job(out_name, dtype, read.out_shape(shape), read)


def file_order(ck: Checkpoint) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, shard by shard in offset order."""
    out = []
    for shard in ck.layout.shards:
        for t in ck.headers[shard].tensors.values():  # sorted by offset
            if ck.where.get(t.name) == shard:
                out.append((t.name, t.dtype, t.shape))
    return out


def check_source(src: Gemma3nConfig, tensors: Sequence[tuple[str, str, tuple[int, ...]]],
                 where: str) -> None:
    """The text tensors must be exactly what config.json describes."""
    required, optional = text_shapes(src.text, src.widths, src.first_shared)
    p = src.prefix
    found = {n[len(p):]: s for n, _, s in tensors if n.startswith(p)}
    for rel, shape in found.items():
        want = required.get(rel, optional.get(rel))
        if want is None:
            raise CheckpointError(f"{where}: unexpected tensor {p + rel!r}, not part of the Gemma 3n "
                                  f"text model config.json describes")
        if tuple(shape) != want:
            raise CheckpointError(f"{where}: tensor {p + rel!r} has shape {list(shape)}, "
                                  f"config.json expects {list(want)}")
    missing = [p + r for r in required if r not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: tensors {missing[:3]}{more} are missing")


def map_tensors(plan: Gemma3nPlan, tensors: Sequence[tuple[str, str, tuple[int, ...]]],
                where: str) -> list[Job]:
    """Output jobs for the source's (name, dtype, shape) list, in source order."""
    check_source(plan.source, tensors, where)
    p, hp = plan.source.prefix, plan.source.text["hidden_size_per_layer_input"]
    new_index = {i: j for j, i in enumerate(plan.keep)}
    blocks = merge_ranges([(i * hp, (i + 1) * hp) for i in plan.keep])
    jobs: list[Job] = []
    for name, dtype, shape in tensors:
        rel = name[len(p):] if name.startswith(p) else None
        m = _LAYER.match(rel) if rel is not None else None
        if m is not None:
            i, rest = int(m.group(1)), m.group(2)
            if i not in new_index:
                continue
            j = new_index[i]
            w, out = plan.widths[j], f"{p}layers.{j}.{rest}"
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight") and w < shape[0]:
                jobs.append(_job(out, name, dtype, shape, rows=((0, w),)))
            elif rest == "mlp.down_proj.weight" and w < shape[1]:
                jobs.append(_job(out, name, dtype, shape, cols=((0, w),)))
            else:
                jobs.append(_job(out, name, dtype, shape))
        elif rel == PER_LAYER_EMBEDDING:
            jobs.append(_job(name, name, dtype, shape, cols=blocks))
        elif rel == PER_LAYER_PROJECTION:
            jobs.append(_job(name, name, dtype, shape, rows=blocks))
        else:
            jobs.append(_job(name, name, dtype, shape))
    return jobs
