"""Atomic file writes: a file is either its old content or its new content, never a mix.

`atomic_write(path, data)` writes to a temporary file in the same folder, fsyncs it, renames it
over `path` with `os.replace` (atomic on POSIX within one file system) and fsyncs the folder so
the rename itself survives a crash. Used for every small file matformer writes (config, index,
manifest, tokenizer files, logs rewritten in place, JSON reports). Whole checkpoint folders are
swapped by `io.checkpoint` with the same idea one level up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where the OS can't."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) atomically and durably.

    Raises OSError (naming the file) when the folder is not writable; the old file, if any, is
    then unchanged and no temporary file is left behind."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
    return target
