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


TEMP_TAG = ".matformer-"
"""What every temporary file or folder matformer writes beside a target has in its name:
`.<target name, at most 100 characters>.matformer-<tmp|old|stage>-<pid>-<random>`. The pid lets a
later run tell a dead writer's leftovers (removed, `io.swap.remove_dead_temps`) from a live one's."""


def temp_prefix(target: str | os.PathLike) -> str:
    """The name prefix of the temporary files written beside `target` (see `TEMP_TAG`); the
    target's name is cut to 100 characters so that the temporary name stays under 255 bytes."""
    return f".{Path(target).name[:100]}{TEMP_TAG}"


def temp_path(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh temporary name beside `target` (same folder: the final rename is atomic)."""
    t = Path(target)
    return t.parent / f"{temp_prefix(t)}{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) atomically and durably.

    Raises OSError (naming the file) when the folder is not writable; the old file, if any, is
    then unchanged and no temporary file is left behind."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = temp_path(target)
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
