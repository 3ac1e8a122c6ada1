"""Reading part of a stored tensor: the one ranged reader behind slicing, GGUF export and the
Gemma 3n slicer.

A `ReadJob` names a source tensor, the row ranges (dim 0, any rank) and column ranges (dim 1 of a
matrix) to keep, and a dtype to convert to, if any. `TensorReader` reads exactly that part:

- rows only (or the whole tensor): kept rows are contiguous bytes, so each row range is one read
  (a row prefix is one read);
- columns: while the number of (row, column run) pieces is at most `exact_run_limit`, every run
  is read exactly, one pread each; above it (the per-layer embedding table of a real Gemma 3n has
  262_144 rows) rows are read in chunks of about `chunk_bytes` spanning the kept columns, and the
  columns are gathered in memory: more bytes read, far fewer system calls, and the extra memory is
  one chunk, not the tensor.

Each read goes with pread straight into the output's own buffer: no memory map (mapped pages
count against the process and stay resident), no copy beyond the output itself (and the
converted copy, when a dtype conversion is asked for). Reads go to the descriptors the
checkpoint's headers were validated from (`Checkpoint.fds`), so a source folder replaced meanwhile
is never mixed in; a file cut short meanwhile is a one-line `CheckpointError` naming the file and
the tensor. Needs numpy only; `read` imports torch when called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from matformer.errors import CheckpointError
from matformer.io.files import pread_into
from matformer.io.layout import Checkpoint
from matformer.io.safetensors import DTYPES, TensorInfo, nbytes_of, torch_dtype

if TYPE_CHECKING:
    import torch

Ranges = tuple[tuple[int, int], ...]

# Conversions a job may ask for: to float32 from these stored types (GGUF export reads floats).
TO_F32 = ("F32", "F16", "BF16")


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> Ranges:
    """`ranges` (in order) with touching neighbours joined: fewer, longer reads."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


@dataclass(frozen=True)
class ReadJob:
    """What to read of one stored tensor: row ranges of dim 0 and column ranges of dim 1 (a
    matrix) to keep, in order, each [a, b) (None: all), and the dtype to convert to (None: as
    stored; "F32" from F32, F16 or BF16)."""

    src: str
    rows: Ranges | None = None
    cols: Ranges | None = None
    to: str | None = None

    @classmethod
    def prefix(cls, src: str, src_shape: Sequence[int], out_shape: Sequence[int],
               to: str | None = None) -> ReadJob:
        """The leading block `out_shape` of a tensor of `src_shape`: a prefix of dim 0 (any
        rank) and/or of dim 1 of a matrix; every other dim kept whole."""
        s, o = tuple(int(d) for d in src_shape), tuple(int(d) for d in out_shape)
        ok = len(s) == len(o) and all(0 <= b <= a for a, b in zip(s, o, strict=True))
        if not ok or (len(s) > 2 and o[1:] != s[1:]):
            raise CheckpointError(f"{src}: cannot read block {list(o)} of a tensor of shape "
                                  f"{list(s)} (a prefix of dim 0, or of dim 1 of a matrix)")
        rows = ((0, o[0]),) if s and o[0] < s[0] else None
        cols = ((0, o[1]),) if len(s) == 2 and o[1] < s[1] else None
        return cls(src, rows, cols, to)

    def out_shape(self, src_shape: Sequence[int]) -> tuple[int, ...]:
        """The output shape when the source tensor has `src_shape`."""
        out = [int(d) for d in src_shape]
        if self.rows is not None:
            out[0] = sum(b - a for a, b in self.rows)
        if self.cols is not None:
            out[1] = sum(b - a for a, b in self.cols)
        return tuple(out)

    def out_dtype(self, stored: str) -> str:
        """The output's safetensors dtype when the source tensor is `stored`."""
        return self.to or stored


def _check_ranges(job: ReadJob, what: str, ranges: Ranges, dim: int, where: str) -> None:
    pos = 0
    for a, b in ranges:
        if not (pos <= a <= b <= dim):
            raise CheckpointError(f"{where}: tensor {job.src!r}: {what} ranges {list(ranges)} are "
                                  f"not increasing ranges within its {dim} {what}")
        pos = b


class TensorReader:
    """Reads the parts of the tensors of one validated checkpoint that `ReadJob`s name, one
    tensor at a time; counts the bytes read (`bytes_read`) and the reads made (`reads`). Use as
    a context manager (or call `close`): the checkpoint's descriptors are released with it.

    `readahead=False` (slicing) turns the kernel's readahead off, so only the named bytes come
    from disk; it costs time on a cold cache when a tensor is read whole or in many short runs
    (measured here: a 128 MB tensor 0.38 s instead of 0.10 s, the 8192 column runs of a 32 MB
    matrix 1.3 s instead of 0.09 s). `readahead=True` with `exact_run_limit=0` (GGUF export)
    reads every column cut as whole-row chunks with readahead, the disk pattern of a memory map,
    in bounded memory."""

    def __init__(self, checkpoint: Checkpoint, *, exact_run_limit: int = 1 << 16,
                 chunk_bytes: int = 64 << 20, readahead: bool = False) -> None:
        self.ck = checkpoint
        self.folder = checkpoint.layout.folder
        self.exact_run_limit, self.chunk_bytes = exact_run_limit, chunk_bytes
        self.readahead = readahead
        self.advised: set[str] = set()
        self.bytes_read = 0
        self.reads = 0

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.ck.close()

    # ---- public reads -----------------------------------------------------------------------

    def read(self, job: ReadJob) -> torch.Tensor:
        """The kept part of `job.src` as a torch tensor (converted if `job.to`)."""
        import torch

        info = self.ck.info(job.src)
        raw = self._read_raw(job, info)
        out = job.out_shape(info.shape)
        if job.to is not None and job.to != info.dtype:
            return torch.from_numpy(self._convert(job, info, raw).reshape(out))
        dt = torch_dtype(info.dtype)
        return (torch.from_numpy(raw).view(dt) if raw.size else torch.empty(0, dtype=dt)).reshape(out)

    def read_array(self, job: ReadJob) -> np.ndarray:
        """The kept part of `job.src` as a numpy array, for callers without torch. Without a
        conversion the stored element type is kept (BF16, which numpy lacks, as uint16 bits)."""
        info = self.ck.info(job.src)
        raw = self._read_raw(job, info)
        out = job.out_shape(info.shape)
        if job.to is not None and job.to != info.dtype:
            return self._convert(job, info, raw).reshape(out)
        if info.dtype not in _NP:
            raise CheckpointError(f"{self._path(job.src)}: tensor {job.src!r} is {info.dtype}, "
                                  f"which numpy cannot hold; read it as a torch tensor")
        return raw.view(_NP[info.dtype]).reshape(out)

    # ---- the reading --------------------------------------------------------------------------

    def _path(self, name: str) -> os.PathLike:
        return self.folder / self.ck.where[name]

    def _fd(self, shard: str) -> int:
        if shard not in self.ck.fds:
            raise CheckpointError(f"{self.folder / shard}: the checkpoint was closed before reading")
        fd = self.ck.fds[shard]
        if not self.readahead and shard not in self.advised and hasattr(os, "posix_fadvise"):
            # Readahead off: every read names exactly the bytes it needs (row prefixes,
            # column runs); readahead would pull in the skipped tails (measured: 740 MB from
            # disk instead of 586 MB for 431 MB of tensors, 1 GB source to tier 3).
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self.advised.add(shard)
        return fd

    def _pread(self, fd: int, mv: memoryview, offset: int, name: str) -> None:
        try:
            done = pread_into(fd, mv, offset)
        except OSError as e:
            raise CheckpointError(f"{self._path(name)}: tensor {name!r}: cannot read "
                                  f"({e.strerror or e})") from None
        if done < len(mv):
            raise CheckpointError(f"{self._path(name)}: tensor {name!r}: file ended early "
                                  f"(changed while reading?)")
        self.bytes_read += done
        self.reads += 1

    def _read_raw(self, job: ReadJob, info: TensorInfo) -> np.ndarray:
        """The kept bytes, in output order, as a flat uint8 array (the output's storage)."""
        shard = self.ck.where[job.src]
        where = str(self.folder / shard)
        shape, item = tuple(info.shape), DTYPES[info.dtype][0]
        size = self.ck.headers[shard].file_size
        if info.end - info.start != nbytes_of(info.dtype, shape) or info.end > size:
            raise CheckpointError(f"{where}: tensor {job.src!r} data offsets [{info.start}, "
                                  f"{info.end}) do not fit its shape or the file ({size} bytes)")
        if job.cols is not None and len(shape) != 2:
            raise CheckpointError(f"{where}: tensor {job.src!r} of shape {list(shape)}: column "
                                  f"ranges need a matrix")
        if job.rows is not None and not shape:
            raise CheckpointError(f"{where}: tensor {job.src!r} is a scalar: it has no rows")
        if job.rows is not None:
            _check_ranges(job, "rows", job.rows, shape[0], where)
        if job.cols is not None:
            _check_ranges(job, "columns", job.cols, shape[1], where)
        out = np.empty(nbytes_of(info.dtype, job.out_shape(shape)), dtype=np.uint8)
        if not out.size:
            return out
        fd = self._fd(shard)
        rows = job.rows if job.rows is not None else ((0, shape[0] if shape else 1),)
        cols = job.cols
        if cols is not None and cols == ((0, shape[1]),):
            cols = None  # every column: whole rows
        if cols is None:  # kept rows are contiguous bytes: one read per row range
            row_bytes = nbytes_of(info.dtype, shape[1:])
            mv, pos = memoryview(out), 0
            for a, b in rows:
                n = (b - a) * row_bytes
                if n:
                    self._pread(fd, mv[pos:pos + n], info.start + a * row_bytes, job.src)
                pos += n
            return out
        runs = [(a * item, b * item) for a, b in cols if b > a]
        dst = out.reshape(-1, sum(b - a for a, b in runs))
        n_rows = sum(b - a for a, b in rows)
        if n_rows * len(runs) <= self.exact_run_limit:
            self._exact_columns(fd, info.start, shape[1] * item, rows, runs, dst, job.src)
        else:
            self._chunked_columns(fd, info.start, shape[1] * item, rows, runs, dst, job.src)
        return out

    def _exact_columns(self, fd: int, start: int, src_row: int, rows: Ranges,
                       runs: list[tuple[int, int]], dst: np.ndarray, name: str) -> None:
        """One pread per kept row and column run, straight into the output."""
        mv, pos = memoryview(dst.reshape(-1)), 0
        for a, b in rows:
            for r in range(a, b):
                at = start + r * src_row
                for x, y in runs:
                    self._pread(fd, mv[pos:pos + y - x], at + x, name)
                    pos += y - x

    def _chunked_columns(self, fd: int, start: int, src_row: int, rows: Ranges,
                         runs: list[tuple[int, int]], dst: np.ndarray, name: str) -> None:
        """Blocks of about `chunk_bytes` of whole rows (from the first kept column of the first
        row to the last kept column of the last), read into one reused scratch buffer; the kept
        columns are copied out of it."""
        lo, hi = runs[0][0], runs[-1][1]
        step = max(1, self.chunk_bytes // src_row)
        scratch = np.empty(min(step, max(b - a for a, b in rows)) * src_row, dtype=np.uint8)
        o = 0
        for a, b in rows:
            for r0 in range(a, b, step):
                r1 = min(b, r0 + step)
                span = (r1 - r0 - 1) * src_row + hi - lo
                self._pread(fd, memoryview(scratch)[lo:lo + span], start + r0 * src_row + lo, name)
                block = scratch[:(r1 - r0) * src_row].reshape(r1 - r0, src_row)
                pos = 0
                for x, y in runs:
                    dst[o:o + r1 - r0, pos:pos + y - x] = block[:, x:y]
                    pos += y - x
                o += r1 - r0

    def _convert(self, job: ReadJob, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
        if job.to != "F32" or info.dtype not in TO_F32:
            raise CheckpointError(f"{self._path(job.src)}: tensor {job.src!r} is {info.dtype}; "
                                  f"cannot convert it to {job.to} (F32 from {', '.join(TO_F32)})")
        if info.dtype == "F32":
            return raw.view(np.float32)
        if info.dtype == "BF16":  # bfloat16 is the top half of a float32
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return raw.view(np.float16).astype(np.float32)


# numpy element types of the stored dtypes numpy has (BF16 as its bits).
_NP = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
       "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "U32": np.uint32,
       "F32": np.float32, "F64": np.float64, "I64": np.int64, "U64": np.uint64,
       "C64": np.complex64}
