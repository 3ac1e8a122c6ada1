"""Opening files matformer did not write: regular files only, sizes capped, one-line errors.

Every metadata file (config.json, an index, a manifest, a safetensors header) and every weight
file is opened through `open_regular`: it opens without blocking (a FIFO named config.json would
otherwise hang the process until someone writes to it), refuses anything that is not a regular
file (FIFOs, devices such as /dev/zero, sockets, folders) before reading a byte, and can open
relative to a folder's descriptor (`dir_fd`) so that every file of one load comes from the same
folder generation (see `io.folder`). `read_json` caps the bytes read, refuses NaN/Infinity
(not JSON) and turns too-deep nesting into the same one-line error as any other bad JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

from matformer.errors import CheckpointError, MatFormerError

MAX_JSON_BYTES = 64_000_000
"""Largest metadata JSON file read (config.json, index, manifest): far above any real one."""


def file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def open_regular(path: str | os.PathLike, *, dir_fd: int | None = None,
                 error: type[MatFormerError] = CheckpointError, shown: str | None = None) -> int:
    """A read-only descriptor of the regular file `path` (relative to `dir_fd` if given).

    Raises `error` naming the file when it is missing, unreadable or not a regular file; a FIFO
    or device is refused without blocking and without reading from it."""
    name = shown or os.fspath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except OSError as e:
        raise error(f"{name}: cannot open ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{name}: is {file_kind(st.st_mode)}, not a regular file; refusing to read it")
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill `buf` from byte `offset` of `fd`; returns how many bytes came (fewer only where the
    file ends). The one positional-read loop of the package: headers, metadata files, GGUF
    blocks and the ranged tensor reader (io/tensors.py) all read through it. OSError propagates
    for the caller to name the file."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def pread_upto(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes from byte `offset` of `fd` (fewer only where the file ends)."""
    buf = bytearray(n)
    got = pread_into(fd, memoryview(buf), offset)
    return bytes(buf) if got == n else bytes(buf[:got])


def read_fd(fd: int, limit: int, name: str, error: type[MatFormerError] = CheckpointError) -> bytes:
    """All bytes of an open regular file from offset 0, refusing files over `limit` bytes."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise error(f"{name}: {size} bytes, over the {limit}-byte limit for this kind of file; "
                    f"not a matformer metadata file?")
    return pread_upto(fd, size, 0)


def read_bytes(path: str | os.PathLike, *, limit: int, dir_fd: int | None = None,
               error: type[MatFormerError] = CheckpointError, shown: str | None = None) -> bytes:
    fd = open_regular(path, dir_fd=dir_fd, error=error, shown=shown)
    try:
        return read_fd(fd, limit, shown or os.fspath(path), error)
    except OSError as e:
        raise error(f"{shown or os.fspath(path)}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, name: str, error: type[MatFormerError] = CheckpointError,
               object_pairs_hook: Any = None) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, nesting errors reported in one line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise error(f"{name}: not valid JSON (nested too deeply)") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise error(f"{name}: not valid JSON ({str(e).splitlines()[0][:200]})") from None


def read_json(path: str | os.PathLike, *, limit: int = MAX_JSON_BYTES, dir_fd: int | None = None,
              error: type[MatFormerError] = CheckpointError, shown: str | None = None) -> Any:
    """The parsed JSON of a regular file of at most `limit` bytes (see `parse_json`)."""
    name = shown or os.fspath(path)
    return parse_json(read_bytes(path, limit=limit, dir_fd=dir_fd, error=error, shown=name), name,
                      error)


def is_regular(path: str | os.PathLike) -> bool:
    """True for an existing regular file (following links); never opens it."""
    with contextlib.suppress(OSError):
        return stat.S_ISREG(os.stat(path).st_mode)
    return False


def identity(fd: int) -> tuple[int, int, int, int]:
    """(st_dev, st_ino, size, mtime_ns) of an open file: what changes when it is replaced or
    rewritten in place."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))
