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

Column runs are read exactly (one pread per row and run) while that is at most
`exact_run_limit` reads; above it (the per-layer embedding table of a real model has 262_144
rows) rows are read in chunks of about `chunk_bytes` spanning the kept columns, and the columns
are gathered in memory: more bytes read, far fewer system calls, memory bounded by the chunk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matformer.errors import CheckpointError
from matformer.io.layout import Checkpoint
from matformer.io.safetensors import DTYPES, nbytes_of, torch_dtype
from matformer.slicing.gemma3n.config import Gemma3nConfig
from matformer.slicing.gemma3n.plan import Gemma3nPlan
from matformer.slicing.gemma3n.shapes import PER_LAYER_EMBEDDING, PER_LAYER_PROJECTION, text_shapes

Ranges = tuple[tuple[int, int], ...]
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Job:
    """One output tensor: its source, and the kept row / column ranges (None: all)."""

    out_name: str
    src_name: str
    dtype: str
    src_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    rows: Ranges | None = None
    cols: Ranges | None = None


def _merge(ranges: Sequence[tuple[int, int]]) -> Ranges:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


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
    blocks = _merge([(i * hp, (i + 1) * hp) for i in plan.keep])
    kept_hp = len(plan.keep) * hp
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
                jobs.append(Job(out, name, dtype, shape, (w, shape[1]), rows=((0, w),)))
            elif rest == "mlp.down_proj.weight" and w < shape[1]:
                jobs.append(Job(out, name, dtype, shape, (shape[0], w), cols=((0, w),)))
            else:
                jobs.append(Job(out, name, dtype, shape, shape))
        elif rel == PER_LAYER_EMBEDDING:
            jobs.append(Job(name, name, dtype, shape, (shape[0], kept_hp), cols=blocks))
        elif rel == PER_LAYER_PROJECTION:
            jobs.append(Job(name, name, dtype, shape, (kept_hp, shape[1]), rows=blocks))
        else:
            jobs.append(Job(name, name, dtype, shape, shape))
    return jobs


class RangeReader:
    """Reads the kept part of one source tensor at a time with pread into the output tensor's own
    storage (no memory map), from the descriptors the checkpoint's headers were validated from
    (so every byte comes from the files that were checked; the Checkpoint owns and closes them).
    Counts the bytes it reads and the reads it makes."""

    def __init__(self, checkpoint: Checkpoint, *, exact_run_limit: int = 1 << 16,
                 chunk_bytes: int = 64 << 20) -> None:
        self.folder, self.ck = checkpoint.layout.folder, checkpoint
        self.exact_run_limit, self.chunk_bytes = exact_run_limit, chunk_bytes
        self.bytes_read = 0
        self.reads = 0

    def _fd(self, shard: str) -> int:
        return self.ck.fds[shard]

    def _pread(self, fd: int, mv: memoryview, offset: int, shard: str) -> None:
        done = 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.folder / shard}: file ended early (changed while "
                                      f"reading?)")
            done += n
        self.bytes_read += done
        self.reads += 1

    def read(self, job: Job) -> Any:
        import torch

        info, shard = self.ck.info(job.src_name), self.ck.where[job.src_name]
        fd, item = self._fd(shard), DTYPES[job.dtype][0]
        buf = torch.empty(nbytes_of(job.dtype, job.out_shape), dtype=torch.uint8)
        mv = memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
        if job.cols is not None:
            self._read_cols(fd, shard, info.start, job, item, buf)
        elif job.rows is not None:
            row_bytes = nbytes_of(job.dtype, job.src_shape[1:])
            pos = 0
            for a, b in job.rows:
                n = (b - a) * row_bytes
                self._pread(fd, mv[pos:pos + n], info.start + a * row_bytes, shard)
                pos += n
        elif len(mv):
            self._pread(fd, mv, info.start, shard)
        return buf.view(torch_dtype(job.dtype)).reshape(job.out_shape)

    def _read_cols(self, fd: int, shard: str, start: int, job: Job, item: int, out: Any) -> None:
        import torch

        rows, cols = job.src_shape
        runs = [(a * item, b * item) for a, b in job.cols or ()]
        src_row, out_row = cols * item, job.out_shape[1] * item
        dst = out.view(rows, out_row)
        if rows * len(runs) <= self.exact_run_limit:
            for r in range(rows):
                mv = memoryview(dst[r].numpy())
                pos = 0
                for a, b in runs:
                    self._pread(fd, mv[pos:pos + b - a], start + r * src_row + a, shard)
                    pos += b - a
            return
        lo, hi = runs[0][0], runs[-1][1]
        step = max(1, self.chunk_bytes // src_row)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            span = (r1 - r0 - 1) * src_row + hi - lo
            scratch = torch.empty((r1 - r0) * src_row, dtype=torch.uint8)
            self._pread(fd, memoryview(scratch.numpy())[lo:lo + span], start + r0 * src_row + lo,
                        shard)
            block = scratch.view(r1 - r0, src_row)
            dst[r0:r1] = torch.cat([block[:, a:b] for a, b in runs], dim=1)
