"""Replacing a checkpoint folder whole: what a save promises (docs/RELIABILITY.md).

`atomic_folder(out_dir, fill)` runs `fill(tmp)` to write the new checkpoint into a fresh folder
beside the target, fsyncs it, and swaps it in with one `renameat2(RENAME_EXCHANGE)`: the old
folder stays complete until the instant the new one replaces it, so a crash (kill -9, power)
leaves the old checkpoint or the new one, and a reader that opened the folder before the swap
keeps reading the old one (io.folder). Around that:

- where: `save_target` resolves symlinks (a save into `runs/latest -> runs/real` writes into
  runs/real; the link stays) and refuses the working folder or any folder containing it (the
  swap would pull it from under the process).
- how: a folder that cannot be renamed (a mount point, e.g. a container volume, or a bind
  mount; or one on another file system than its parent) cannot be swapped: it is detected
  before anything is written (`check_save_target`, called by training before its first step)
  and the save falls back to replacing each file atomically inside it (shards, then the index,
  then config.json; a reader meanwhile gets a `CheckpointChanged`, never a mix, thanks to the
  save id in every file). The same fallback runs if the swap fails with EBUSY/EXDEV anyway.
- what is kept: files of the old folder that are not part of the checkpoint (logs, notes) are
  carried over as hard links, and files another process creates in the folder while a save
  runs are moved into the new folder after the swap instead of being deleted with the old one.
- concurrent saves into one folder are serialized (flock on the parent folder, or on the folder
  itself in the fallback): each completes, the last one wins, none fails half-way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from matformer.errors import CheckpointError
from matformer.io.atomic import fsync_dir, temp_prefix

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
SWAP, REPLACE = "swap", "replace"


class _NoSwap(Exception):
    """The folder cannot be swapped (EBUSY/EXDEV): use per-file replacement."""


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where the OS can't."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    if err in (errno.EBUSY, errno.EXDEV):
        raise _NoSwap(os.strerror(err))
    raise CheckpointError(f"{b}: cannot swap in the new checkpoint ({os.strerror(err)})")


def _mount_points() -> set[str]:
    """Mount points of this process (bind mounts too, which os.path.ismount misses)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4:
                    found.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4]))
    return found


def is_mount_point(path: Path) -> bool:
    if os.path.ismount(path) or str(path) in _mount_points():
        return True
    with contextlib.suppress(OSError):
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    return False


def save_target(out_dir: str | os.PathLike) -> tuple[Path, str]:
    """(the real folder a save into `out_dir` writes, SWAP or REPLACE); a CheckpointError for a
    target no save may replace."""
    given = Path(out_dir).absolute()
    target = Path(os.path.realpath(given))  # through symlinks: the link itself stays
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{given}: exists and is not a folder")
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        raise CheckpointError(f"{given}: is the working folder or contains it; a save replaces the "
                              f"whole folder, which would pull it from under this process. Save "
                              f"into a subfolder (e.g. {given / 'model'})")
    if target.exists() and is_mount_point(target):
        return target, REPLACE
    if target.exists() and not os.access(target.parent, os.W_OK | os.X_OK):
        return target, REPLACE
    return target, SWAP


def check_save_target(out_dir: str | os.PathLike) -> str:
    """Before a long job: how a save into `out_dir` will be done (SWAP or REPLACE), or the
    CheckpointError a save would raise at its end (a refused target, an unwritable folder)."""
    target, mode = save_target(out_dir)
    where = target if mode == REPLACE else _first_existing(target.parent)
    probe = where / f".matformer-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise CheckpointError(f"{out_dir}: cannot save there ({e.strerror or e} in {where}); "
                              f"choose another output folder") from None
    return mode


def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` (flock on its descriptor: no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _tmp_prefix(target: Path) -> str:
    return temp_prefix(target)


_ACTIVE: set[str] = set()
"""Temporary folders this process is writing now (other threads' saves must not remove them)."""


def remove_dead_temps(folder: str | os.PathLike, prefix: str) -> None:
    """Remove the temporary files and folders named `<prefix><tmp|old|stage>-<pid>-...` in
    `folder` whose writer process is gone (a save or an export that was killed)."""
    _cleanup_stale(Path(folder), prefix)


def _cleanup_stale(folder: Path, prefix: str) -> None:
    """Remove temporary folders (and files) left by writers that were killed (their process is
    gone)."""
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            if not entry.name.startswith(prefix) or str(entry) in _ACTIVE:
                continue
            m = re.match(r"(tmp|old|stage)-(\d+)-", entry.name[len(prefix):])
            if not m:
                continue
            pid = int(m.group(2))
            if pid != os.getpid():
                try:
                    os.kill(pid, 0)
                    continue  # a live process may still be writing it
                except ProcessLookupError:
                    pass
                except (PermissionError, OverflowError):
                    continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Files of the old folder that are not part of the checkpoint (logs, notes, a tokenizer not
    given again) stay: hard links, so nothing is copied."""
    for entry in old.iterdir():
        if entry.name in skip or os.path.lexists(new / entry.name) or entry.name.startswith(".matformer-"):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _rescue(old: Path, new: Path, ours: set[str]) -> None:
    """After the swap: what appeared or changed in the old folder after `_carry_over` (another
    process wrote there during the save) moves into the new folder instead of being deleted."""
    for entry in old.iterdir():
        if entry.name in ours or entry.name.startswith(".matformer-"):
            continue
        dst = new / entry.name
        with contextlib.suppress(OSError):
            if not os.path.lexists(dst):
                os.rename(entry, dst)
            elif entry.is_file() and not entry.is_symlink() and not os.path.samefile(entry, dst):
                os.replace(entry, dst)  # replaced after it was carried over: the newer one


def atomic_folder(out_dir: str | os.PathLike, fill: Callable[[Path], set[str]],
                  checkpoint_files: Callable[[Path], set[str]]) -> Path:
    """Write a folder with `fill(tmp)` (returns the names written) and put it in place of
    `out_dir` (see the module docstring). `checkpoint_files(folder)`: the names of an existing
    folder that belong to its checkpoint (replaced, never carried over)."""
    target, mode = save_target(out_dir)
    if mode == REPLACE:
        return _replace_files(target, fill, checkpoint_files)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _cleanup_stale(target.parent, _tmp_prefix(target))
        tmp = target.parent / f"{_tmp_prefix(target)}tmp-{os.getpid()}-{secrets.token_hex(4)}"
        _ACTIVE.add(str(tmp))
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"{target}: cannot create a temporary folder beside it "
                              f"({e.strerror or e}); the parent folder must be writable") from None
    try:
        written = fill(tmp)
        fsync_dir(tmp)
        with _locked(target.parent):
            _swap_in(tmp, target, written, checkpoint_files)
    except _NoSwap:
        _install(tmp, target, written, checkpoint_files)
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise CheckpointError(f"{target}: cannot write the checkpoint: {e.strerror or e}{where}; "
                              f"the previous checkpoint (if any) is unchanged") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _ACTIVE.discard(str(tmp))
    return target


def _swap_in(tmp: Path, target: Path, written: set[str],
             checkpoint_files: Callable[[Path], set[str]]) -> None:
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    ours = checkpoint_files(target) | written
    _carry_over(target, tmp, ours)
    fsync_dir(tmp)
    if _exchange(tmp, target):
        fsync_dir(target.parent)
        _rescue(tmp, target, ours)  # tmp now holds the old folder
        return
    # No atomic exchange on this platform: two renames (a crash between them leaves the old
    # checkpoint in `.NAME.matformer-old-*` beside the target).
    old = target.parent / f"{_tmp_prefix(target)}old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    _rescue(old, target, ours)
    shutil.rmtree(old, ignore_errors=True)


def _replace_files(target: Path, fill: Callable[[Path], set[str]],
                   checkpoint_files: Callable[[Path], set[str]]) -> Path:
    """The fallback for folders that cannot be swapped: write into a hidden staging folder
    inside the target (same file system), then replace file by file."""
    _cleanup_stale(target, ".matformer-")
    stage = target / f".matformer-stage-{os.getpid()}-{secrets.token_hex(4)}"
    _ACTIVE.add(str(stage))
    try:
        stage.mkdir()
        written = fill(stage)
        fsync_dir(stage)
        _install(stage, target, written, checkpoint_files)
    except OSError as e:
        raise CheckpointError(f"{target}: cannot write the checkpoint: {e.strerror or e}; files "
                              f"not yet replaced are unchanged") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        _ACTIVE.discard(str(stage))
    return target


def _install(stage: Path, target: Path, written: set[str],
             checkpoint_files: Callable[[Path], set[str]]) -> None:
    """Per-file atomic replacement: weights and other files first, then the index, config.json
    last; then the old checkpoint's files the new one does not have are removed."""
    target.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        stale = checkpoint_files(target) - written
        last = ["model.safetensors.index.json", "config.json"]
        for name in sorted(written, key=lambda n: (last.index(n) + 1) if n in last else 0):
            src, dst = stage / name, target / name
            try:
                os.replace(src, dst)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                tmp = target / f".matformer-copy-{os.getpid()}-{secrets.token_hex(4)}"
                shutil.copyfile(src, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, dst)
        fsync_dir(target)
        for name in stale:
            with contextlib.suppress(OSError):
                (target / name).unlink()
        fsync_dir(target)
