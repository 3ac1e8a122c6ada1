"""A strict safetensors reader and a streaming writer (spec §3), with no torch import at module
level so that `matformer info` can read headers without loading torch.

File layout: 8-byte little-endian u64 N, N bytes of UTF-8 JSON, then the data buffer. Every
tensor entry is `{"dtype", "shape", "data_offsets": [begin, end)}` relative to the buffer.

The reader checks more than the reference implementation: it also rejects duplicate JSON keys
(the reference keeps the last one), recognises Git LFS pointers and truncated downloads by name,
and reports every problem as a `CheckpointError` that names the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matformer.errors import CheckpointError
from matformer.io.files import identity, open_regular, pread_upto

MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit
_U64_MAX = (1 << 64) - 1
_LFS_MAGIC = b"version https://git-lfs"

# safetensors dtype -> (bytes per element, torch dtype attribute name). Sub-byte types (F4, F6)
# are left out: matformer never writes them and their spans are counted in bits.
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "C64": (8, "complex64"),
    "F64": (8, "float64"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
}
_TORCH_TO_ST = {name: st for st, (_, name) in DTYPES.items()}


def nbytes_of(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of safetensors `dtype` and `shape`."""
    n = DTYPES[dtype][0]
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the first byte in the file
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    path: Path
    header_len: int  # N
    tensors: dict[str, TensorInfo]  # in file order (sorted by offset)
    metadata: dict[str, str] | None
    file_size: int
    identity: tuple[int, int, int, int] | None = None
    """(st_dev, st_ino, size, mtime_ns) of the file the header was read from."""

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise _Dup(k)
        d[k] = v
    return d


class _Dup(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: str | os.PathLike) -> Header:
    """Parse and fully validate the header of a safetensors file (spec §3)."""
    fd = open_regular(path)
    try:
        return read_header_fd(fd, Path(path))
    finally:
        os.close(fd)


def read_header_fd(fd: int, p: Path) -> Header:
    """`read_header` of an open file (`p` names it in messages): the header and, later, the
    memory map come from this one descriptor, so from one file even if the path is replaced."""
    try:
        size = os.fstat(fd).st_size
        head = pread_upto(fd, 8, 0)
        if head == _LFS_MAGIC[:8] and pread_upto(fd, len(_LFS_MAGIC), 0) == _LFS_MAGIC:
            raise CheckpointError(
                f"{p}: is a Git LFS pointer, not weights; fetch the real file "
                f"(`git lfs pull`, or download through huggingface_hub)"
            )
        if len(head) < 8:
            raise CheckpointError(f"{p}: file of {size} bytes is too short to be safetensors "
                                  f"(truncated download?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{p}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte "
                                  f"limit; not a safetensors file or corrupted")
        if n + 8 > size:
            raise CheckpointError(f"{p}: header says {n} bytes but the file has only {size}; "
                                  f"truncated download or not a safetensors file")
        raw = pread_upto(fd, n, 8)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(raw) != n:
        raise CheckpointError(f"{p}: file changed while reading its header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{p}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Dup as e:
        raise CheckpointError(f"{p}: header has the key {e.key!r} twice; refusing an ambiguous file") from None
    except RecursionError:
        raise CheckpointError(f"{p}: header is not valid JSON (nested too deeply)") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{p}: header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: header must be a JSON object, got {type(obj).__name__}")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError(f"{p}: __metadata__ must map strings to strings")
    buffer_len = size - 8 - n
    entries: list[TensorInfo] = []
    for name, e in obj.items():
        if not isinstance(e, dict):
            raise CheckpointError(f"{p}: entry for tensor {name!r} is not an object")
        unknown = set(e) - {"dtype", "shape", "data_offsets"}
        missing = {"dtype", "shape", "data_offsets"} - set(e)
        if missing or unknown:
            raise CheckpointError(f"{p}: tensor {name!r} entry has missing keys {sorted(missing)} "
                                  f"or unknown keys {sorted(unknown)}")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{p}: tensor {name!r} has unknown dtype {dtype!r} "
                                  f"(known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _U64_MAX for d in shape):
            raise CheckpointError(f"{p}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(_is_int(o) and 0 <= o <= _U64_MAX for o in offs)):
            raise CheckpointError(f"{p}: tensor {name!r} has invalid data_offsets {offs!r}")
        begin, end = offs
        if end < begin:
            raise CheckpointError(f"{p}: tensor {name!r} has data_offsets {offs} that end before "
                                  f"they begin")
        nbytes = DTYPES[dtype][0]
        for d in shape:
            nbytes *= d
            if nbytes > _U64_MAX:  # the reference checks for u64 overflow
                raise CheckpointError(f"{p}: tensor {name!r} shape {shape} overflows 64 bits")
        if nbytes != end - begin:
            raise CheckpointError(
                f"{p}: tensor {name!r} ({dtype}, shape {shape}) needs {nbytes} bytes but its "
                f"data_offsets {offs} span {end - begin}"
            )
        entries.append(TensorInfo(name, dtype, tuple(shape), 8 + n + begin, 8 + n + end))
    entries.sort(key=lambda t: (t.start, t.end))
    pos = 8 + n
    for t in entries:
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else "leaves a hole before it"
            raise CheckpointError(f"{p}: tensor {t.name!r} at buffer offset {t.start - 8 - n} {what} "
                                  f"(expected offset {pos - 8 - n}); the file is corrupted")
        pos = t.end
    covered = pos - 8 - n
    if covered > buffer_len:
        raise CheckpointError(
            f"{p}: tensors need {covered} bytes of data but the file holds {buffer_len} after the "
            f"header; file not fully covered, truncated download? Download it again"
        )
    if covered < buffer_len:
        raise CheckpointError(f"{p}: {buffer_len - covered} trailing bytes after the last tensor; "
                              f"the file is corrupted or was written by a broken tool")
    return Header(p, n, {t.name: t for t in entries}, metadata, size, identity(fd))


# ---- tensors --------------------------------------------------------------------------------


def torch_dtype(st_dtype: str):
    import torch

    return getattr(torch, DTYPES[st_dtype][1])


def st_dtype(dtype) -> str:
    """safetensors dtype string of a torch dtype (or its name)."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name in DTYPES:
        return name
    if name not in _TORCH_TO_ST:
        raise CheckpointError(f"dtype {dtype} cannot be written to safetensors by matformer")
    return _TORCH_TO_ST[name]


# ---- writing --------------------------------------------------------------------------------


def build_header(specs: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included, padded to 8) for tensors written in `specs` order,
    and their byte sizes."""
    entries: dict[str, Any] = {}
    sizes: list[int] = []
    off = 0
    for name, dtype, shape in specs:
        if dtype not in DTYPES:
            raise CheckpointError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if name in entries or name == "__metadata__":
            raise CheckpointError(f"tensor name {name!r} given twice (or reserved)")
        n = nbytes_of(dtype, shape)
        entries[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [off, off + n]}
        sizes.append(n)
        off += n
    head: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    head.update(entries)
    js = json.dumps(head, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 8)  # the data buffer starts 8-aligned
    return struct.pack("<Q", len(js)) + js, sizes


def tensor_bytes(t) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous. A
    numpy array works too (io.gguf_source writes without importing torch)."""
    if not hasattr(t, "detach"):
        import numpy as np

        a = np.ascontiguousarray(t).reshape(-1)
        return memoryview(a.view(np.uint8)).cast("B") if a.size else memoryview(b"")
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def write_file(path: str | os.PathLike, specs: Sequence[tuple[str, str, Sequence[int]]],
               produce: Callable[[str], Any], metadata: Mapping[str, str] | None = None,
               observe: Callable[[memoryview], None] | None = None) -> int:
    """Write one safetensors file, calling `produce(name)` for one tensor at a time (so the
    peak memory is one tensor). Checks each tensor against its spec; fsyncs. Returns the size.
    `observe(bytes)` sees every tensor's bytes as written (checksums)."""
    header, sizes = build_header(specs, metadata)
    p = Path(path)
    with open(p, "wb") as f:
        f.write(header)
        for (name, dtype, shape), n in zip(specs, sizes, strict=True):
            t = produce(name)
            got = st_dtype(t.dtype)
            if got != dtype or tuple(t.shape) != tuple(int(d) for d in shape):
                raise CheckpointError(
                    f"{p.name}: tensor {name!r} was announced as {dtype} {list(shape)} but is "
                    f"{got} {list(t.shape)}"
                )
            buf = tensor_bytes(t)
            if len(buf) != n:
                raise CheckpointError(f"{p.name}: tensor {name!r} has {len(buf)} bytes, expected {n}")
            if observe is not None:
                observe(buf)
            f.write(buf)
            del t, buf
        f.flush()
        os.fsync(f.fileno())
        return f.tell()
