"""One generation of a checkpoint folder: every file of one load comes from the same save.

Saves replace a checkpoint folder whole (`io.checkpoint` swaps a complete new folder in with
`renameat2(RENAME_EXCHANGE)`). A reader that opened files by path could read config.json and
the index of one save and a shard of the next. `Folder` opens the folder once (O_DIRECTORY) and
opens every file relative to that descriptor (openat), so a load reads the folder it started
with even if a save swaps a new one in meanwhile. A file that vanishes under it (the old folder
is deleted after the swap) or is not the file seen earlier in the same load (st_dev, st_ino,
size, mtime_ns) raises `CheckpointChanged`: the caller reads again and sees the new save.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from matformer.errors import CheckpointChanged, CheckpointError, MatFormerError
from matformer.io.files import MAX_JSON_BYTES, identity, open_regular, parse_json, read_fd

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


class Folder:
    """A folder opened by descriptor; files are opened relative to it and checked for identity."""

    def __init__(self, path: str | os.PathLike, *, dir_fd: int | None = None,
                 shown: Path | None = None) -> None:
        self.path = shown or Path(path)
        self.fd = -1
        try:
            self.fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such folder") from None
        except NotADirectoryError:
            raise CheckpointError(f"{self.path}: not a folder") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open the folder ({e.strerror or e})") from None
        st = os.fstat(self.fd)
        self.ident = (st.st_dev, st.st_ino)
        self.seen: dict[str, tuple[int, int, int, int]] = {}
        self.probed: set[str] = set()

    def sub(self, name: str) -> Folder:
        """A subfolder, opened relative to this one (the same generation)."""
        try:
            return Folder(name, dir_fd=self.fd, shown=self.path / name)
        except CheckpointError:
            self._check_alive(name)
            raise

    def removed(self) -> bool:
        """True once the folder itself was deleted (a save swapped it out and cleaned it up)."""
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True

    def replaced(self) -> bool:
        """True once the path names another folder than the one opened (a save swapped a new
        one in; the one held is the old version, being deleted)."""
        if self.removed():
            return True
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.ident

    def check_current(self, what: str) -> None:
        """A file the load needs is missing: CheckpointChanged if a save replaced the folder
        meanwhile (reading again sees the new one), else nothing (the caller reports it)."""
        if self.replaced():
            raise CheckpointChanged(f"{self.path}: {what} while the checkpoint was read (a save "
                                    f"replaced the folder); read it again")

    def _check_alive(self, name: str) -> None:
        self.check_current(f"{name} disappeared")
        if name in self.probed or name in self.seen:
            raise CheckpointChanged(f"{self.path / name}: disappeared while the checkpoint was "
                                    f"read (a save replaced it); read it again")

    def exists(self, name: str) -> bool:
        """Whether `name` is in the folder; errors other than absence are reported."""
        try:
            os.stat(name, dir_fd=self.fd)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            raise CheckpointError(f"{self.path / name}: cannot access ({e.strerror or e})") from None
        self.probed.add(name)
        return True

    def is_file(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self.fd).st_mode)
        except OSError:
            return False

    def _present(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def open(self, name: str) -> int:
        """A read-only descriptor of regular file `name` (the caller closes it); the same name
        opened twice in one load must be the same file."""
        try:
            fd = open_regular(name, dir_fd=self.fd, shown=str(self.path / name))
        except CheckpointError:
            if not self._present(name):
                self._check_alive(name)
            raise
        ident = identity(fd)
        if self.seen.setdefault(name, ident) != ident:
            os.close(fd)
            raise CheckpointChanged(f"{self.path / name}: was replaced while the checkpoint was "
                                    f"read (a save ran at the same time); read it again")
        return fd

    def read_bytes(self, name: str, limit: int = MAX_JSON_BYTES,
                   error: type[MatFormerError] = CheckpointError) -> bytes:
        fd = self.open(name)
        try:
            return read_fd(fd, limit, str(self.path / name), error)
        finally:
            os.close(fd)

    def read_json(self, name: str, limit: int = MAX_JSON_BYTES,
                  error: type[MatFormerError] = CheckpointError) -> Any:
        return parse_json(self.read_bytes(name, limit, error), str(self.path / name), error)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Folder({str(self.path)!r})"
