"""A strict GGUF reader: the container (header, metadata, tensor table) and one tensor at a time.

Why not `gguf.GGUFReader`: it maps the whole file and trusts its counts, so a file whose header
claims 2^40 array elements or tensors loops (or allocates) for as long as it says, and a tensor
whose offset lies past the end of the file surfaces as a numpy error. Here every count and
length is checked against the bytes the file has left *before* anything is read or allocated,
so a damaged or hostile file costs at most its own size in memory and ends in one
`CheckpointError` that names the file and what is wrong. The `gguf` package still supplies the
format's constants (type ids, block sizes) and the dequantization kernels.

The format (GGUF v2/v3, little-endian): magic `GGUF`, u32 version, u64 tensor count, u64
metadata count; metadata entries (string key, u32 value type, value); tensor infos (string name,
u32 n_dims, n_dims x u64 dims (innermost first), u32 GGML type, u64 offset); padding to
`general.alignment` (default 32); the tensor data, each tensor at data start + offset.

Reads go through one file descriptor with `io.files.pread_upto` (no memory map: mapped pages
would count against the process); metadata arrays are decoded only when asked for (`GGUFFile.get`).
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from matformer.errors import CheckpointError, ConfigError
from matformer.io.files import pread_upto

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 3
MAX_ELEMENTS = 1 << 48  # elements in one tensor: far above any model, far below int64 overflow
_CHUNK = 1 << 20

STRING, ARRAY = 8, 9
# metadata value type -> (struct format, numpy dtype)
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
    5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<B", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
BOOL = 7

DEQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K",
                 "Q6_K")
"""GGML types `GGUFFile.read` turns into float32 (gguf's numpy kernels, checked by tests)."""


def gguf_module():
    """The `gguf` package, or the one-line error that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading a .gguf file needs the `gguf` package: "
                          "pip install 'matformer[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class ArrayRef:
    """A metadata array not decoded yet: its element type, count and where it starts."""

    elem_type: int
    count: int
    offset: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    """numpy order (outermost first): the reverse of GGUF's dims."""
    qtype: int
    type_name: str
    offset: int
    """Absolute position of the first byte in the file."""
    nbytes: int
    row_bytes: int
    """Bytes of one row (the innermost dimension, a whole number of blocks)."""


class _Cursor:
    """Sequential reads of the header through a window of the file; every read is checked
    against the bytes the file has left first."""

    def __init__(self, fd: int, size: int, path: Path) -> None:
        self.fd, self.size, self.path = fd, size, path
        self.pos = 0
        self.buf = b""
        self.buf_at = 0

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"truncated or corrupt GGUF: {what} at byte {self.pos} needs {n} "
                            f"bytes, the file has {self.size - self.pos} left")

    def take(self, n: int, what: str) -> tuple[bytes, int]:
        """(window, offset in it) holding bytes [pos, pos + n); advances."""
        self.need(n, what)
        if not (self.buf_at <= self.pos and self.pos + n <= self.buf_at + len(self.buf)):
            want = min(max(n, _CHUNK), self.size - self.pos)
            self.buf = pread_exact(self.fd, want, self.pos, self.path)
            self.buf_at = self.pos
        at = self.pos - self.buf_at
        self.pos += n
        return self.buf, at

    def unpack(self, fmt: str, what: str) -> Any:
        buf, at = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, buf, at)[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        buf, at = self.take(n, what)
        try:
            return buf[at:at + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - n} is not valid UTF-8") from None

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n


def pread_exact(fd: int, n: int, offset: int, path: Path) -> bytes:
    """Exactly `n` bytes from byte `offset`, or a one-line error: the file is shorter."""
    out = pread_upto(fd, n, offset)
    if len(out) < n:
        raise CheckpointError(f"{path}: the file ended early at byte {offset + len(out)} "
                              f"(changed while reading?)")
    return out


class GGUFFile:
    """An open, validated GGUF file: `metadata` (scalars and strings decoded, arrays as
    `ArrayRef` until `get`), `tensors` (name -> `TensorInfo`, in file order), `read(name)`.
    Use as a context manager (or call `close`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror or e})") from None
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{self.path}: not a regular file")
            self.size = st.st_size
            self.stat = st
            self.metadata: dict[str, Any] = {}
            self.tensors: dict[str, TensorInfo] = {}
            self._parse()
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- parsing ------------------------------------------------------------------------------

    def _parse(self) -> None:
        c = _Cursor(self.fd, self.size, self.path)
        if self.size < 4 or pread_exact(self.fd, 4, 0, self.path) != MAGIC:
            head = pread_exact(self.fd, min(4, self.size), 0, self.path)
            raise CheckpointError(f"{self.path}: not a GGUF file (starts with {head!r}, a GGUF "
                                  f"starts with {MAGIC!r})")
        c.skip(4, "magic")
        version = c.unpack("<I", "the version")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = (" (a big-endian file: not supported)" if swapped in VERSIONS
                    else "; supported: " + ", ".join(map(str, VERSIONS)))
            raise CheckpointError(f"{self.path}: GGUF version {version}{hint}")
        self.version = version
        n_tensors = c.unpack("<Q", "the tensor count")
        n_kv = c.unpack("<Q", "the metadata count")
        # Each metadata entry takes at least 13 bytes (key length, type, 1-byte value), each
        # tensor info at least 32 (name length, n_dims, one dim, type, offset).
        if n_kv * 13 + n_tensors * 32 > self.size - c.pos:
            raise CheckpointError(f"{self.path}: the header claims {n_kv} metadata entries and "
                                  f"{n_tensors} tensors, more than the file's {self.size} bytes "
                                  f"can hold (corrupt or truncated)")
        for _ in range(n_kv):
            key = c.string("a metadata key")
            vtype = c.unpack("<I", f"the type of metadata {key!r}")
            if key in self.metadata:
                raise CheckpointError(f"{self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = self._value(c, vtype, key, 0)
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
                or alignment & (alignment - 1)):
            raise CheckpointError(f"{self.path}: general.alignment={alignment!r} is not a power "
                                  f"of two")
        self.alignment = alignment
        infos = [self._tensor_info(c) for _ in range(n_tensors)]
        self.data_start = -(-c.pos // alignment) * alignment
        self.header_bytes = c.pos
        self._place(infos)

    def _value(self, c: _Cursor, vtype: int, key: str, depth: int) -> Any:
        what = f"the value of metadata {key!r}"
        if vtype in _SCALARS:
            v = c.unpack(_SCALARS[vtype][0], what)
            return bool(v) if vtype == BOOL else v
        if vtype == STRING:
            return c.string(what)
        if vtype != ARRAY:
            raise CheckpointError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise CheckpointError(f"{self.path}: metadata {key!r} nests arrays deeper than "
                                  f"{MAX_ARRAY_DEPTH}")
        elem = c.unpack("<I", what)
        count = c.unpack("<Q", what)
        ref = ArrayRef(elem, count, c.pos)
        if elem in _SCALARS:
            c.skip(count * struct.calcsize(_SCALARS[elem][0]), f"{what} ({count} elements)")
        elif elem == STRING:
            c.need(count * 8, f"{what} ({count} strings)")  # before walking them
            for _ in range(count):
                c.skip(c.unpack("<Q", what), what)
        elif elem == ARRAY:
            c.need(count * 12, f"{what} ({count} arrays)")
            for _ in range(count):
                self._value(c, ARRAY, key, depth + 1)
            return ref
        else:
            raise CheckpointError(f"{self.path}: metadata {key!r} is an array of unknown type "
                                  f"{elem}")
        return ref

    def _tensor_info(self, c: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = c.string("a tensor name")
        n_dims = c.unpack("<I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {n_dims} dimensions "
                                  f"(1 to {MAX_DIMS} allowed)")
        dims = [c.unpack("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        qtype = c.unpack("<I", f"the type of tensor {name!r}")
        offset = c.unpack("<Q", f"the offset of tensor {name!r}")
        return name, tuple(reversed(dims)), qtype, offset

    def _place(self, infos: list[tuple[str, tuple[int, ...], int, int]]) -> None:
        """Sizes from shapes and types, each tensor inside the file, none overlapping."""
        gguf = gguf_module()
        sizes = gguf.GGML_QUANT_SIZES
        data_size = self.size - self.data_start
        spans = []
        for name, shape, qtype, offset in infos:
            if name in self.tensors:
                raise CheckpointError(f"{self.path}: tensor {name!r} appears twice")
            try:
                q = gguf.GGMLQuantizationType(qtype)
            except ValueError:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unknown GGML type "
                                      f"{qtype}") from None
            if q not in sizes:
                raise CheckpointError(f"{self.path}: tensor {name!r} has GGML type {q.name}, "
                                      f"whose size this gguf package does not know")
            block, type_size = sizes[q]
            n = 1
            for d in shape:
                n *= d
            if min(shape) < 1 or n > MAX_ELEMENTS:
                raise CheckpointError(f"{self.path}: tensor {name!r} has an absurd shape "
                                      f"{list(shape)}")
            if shape[-1] % block:
                raise CheckpointError(f"{self.path}: tensor {name!r}: rows of {shape[-1]} values "
                                      f"are not whole {q.name} blocks of {block}")
            nbytes = n // block * type_size
            if offset % self.alignment:
                raise CheckpointError(f"{self.path}: tensor {name!r} at offset {offset} is not "
                                      f"aligned to {self.alignment} bytes")
            if offset > data_size or nbytes > data_size - offset:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ({q.name} {list(shape)}, {nbytes} bytes at "
                    f"data offset {offset}) ends past the end of the file ({data_size} bytes of "
                    f"tensor data): truncated or corrupt")
            self.tensors[name] = TensorInfo(name, shape, int(q), q.name,
                                            self.data_start + offset, nbytes,
                                            shape[-1] // block * type_size)
            spans.append((offset, offset + nbytes, name))
        spans.sort()
        for (_, end, a), (start, _, b) in pairwise(spans):
            if start < end:
                raise CheckpointError(f"{self.path}: tensors {a!r} and {b!r} overlap in the file")

    # ---- values -------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value: int/float/bool/str, a list of str, or a numpy array of numbers
        (an array of arrays: a list of those)."""
        if key not in self.metadata:
            return default
        v = self.metadata[key]
        return self._decode(v, key) if isinstance(v, ArrayRef) else v

    def count(self, key: str) -> int | None:
        """The number of elements of a metadata array (without decoding it), else None."""
        v = self.metadata.get(key)
        return v.count if isinstance(v, ArrayRef) else None

    def _decode(self, ref: ArrayRef, key: str) -> Any:
        return self._decode_at(ref, key)[0]

    def _decode_at(self, ref: ArrayRef, key: str) -> tuple[Any, int]:
        """(value, position after it) of an array validated when the header was parsed."""
        if ref.elem_type in _SCALARS:
            fmt, dt = _SCALARS[ref.elem_type]
            n = ref.count * struct.calcsize(fmt)
            arr = np.frombuffer(pread_exact(self.fd, n, ref.offset, self.path), dtype=dt)
            return (arr.astype(bool) if ref.elem_type == BOOL else arr), ref.offset + n
        c = _Cursor(self.fd, self.size, self.path)
        c.pos = ref.offset
        if ref.elem_type == STRING:
            return [c.string(f"element {i} of metadata {key!r}") for i in range(ref.count)], c.pos
        out, pos = [], ref.offset
        for _ in range(ref.count):
            c.pos = pos
            elem = c.unpack("<I", key)
            count = c.unpack("<Q", key)
            value, pos = self._decode_at(ArrayRef(elem, count, c.pos), key)
            out.append(value)
        return out, pos

    # ---- tensors ------------------------------------------------------------------------------

    def check_dequantizable(self, name: str) -> TensorInfo:
        info = self.tensors[name]
        if info.type_name not in DEQUANTIZABLE:
            raise CheckpointError(f"{self.path}: tensor {name!r} is stored as {info.type_name}, "
                                  f"which matformer cannot read yet (supported: "
                                  f"{', '.join(DEQUANTIZABLE)})")
        return info

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in numpy order (a fresh array; the file is not mapped)."""
        info = self.check_dequantizable(name)
        gguf = gguf_module()
        raw = np.frombuffer(pread_exact(self.fd, info.nbytes, info.offset, self.path), np.uint8)
        rows = raw.reshape(-1, info.row_bytes)
        out = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(info.qtype))
        return np.ascontiguousarray(out.reshape(info.shape), dtype=np.float32)
