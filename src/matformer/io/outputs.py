"""The one rule for every file a command writes where the user said (docs/RELIABILITY.md).

GGUF exports, JSON reports (`eval --json-out`), plots (`--plot`) and prepared token folders
(`prepare-data -o`) all go through `check_output` (before any long work, so a bad path fails
in a second) and are written with `write_output` / `output_temp` (at the end):

- never over a file the command reads: `protect` lists the inputs (for a source checkpoint, the
  files it consists of, `Source.read_files`: `export SRC -o SRC/config.json` is refused, as is
  `eval CK --json-out CK/tokenizer.json`, while a report beside them, `CK/eval.json`, is not); a
  hard link to a protected file is refused too;
- through symlinks: `-o latest.gguf` where latest.gguf -> v3.gguf replaces v3.gguf and the link
  stays (what checkpoint saves do, `io.swap.save_target`);
- only regular files are replaced: a folder, FIFO, device node (`/dev/null`, a `mknod`), socket,
  or a link to one (`/proc/self/fd/1`) is refused with one line, never opened or replaced;
- the new content goes to a temporary file beside the target, named by `io.atomic.temp_path`
  (`.NAME.matformer-tmp-PID-RANDOM`), renamed over the target only when complete; a write that
  fails (ENOSPC, EFBIG under `ulimit -f`, EIO) removes it and is one line naming the file, and a
  writer that was killed leaves one that the next write beside the same target removes
  (`io.swap.remove_dead_temps`: its pid is gone);
- a missing parent folder, an empty name, or a file name over 255 bytes is one line, at once.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from matformer.errors import CheckpointError, ConfigError, MatFormerError
from matformer.io.atomic import fsync_dir, temp_path, temp_prefix
from matformer.io.files import file_kind
from matformer.io.swap import remove_dead_temps

NAME_MAX = 255
"""Bytes in one file name on every common file system (ext4, xfs, btrfs, APFS, NTFS)."""

Protected = Iterable[str | os.PathLike | None]


def check_name(path: str | os.PathLike, *, what: str = "output",
               error: type[MatFormerError] = ConfigError) -> str:
    """`path` as a string, or `error` for a name no file system takes (empty, NUL, a component
    over `NAME_MAX` bytes)."""
    s = os.fspath(path)
    if not s:
        raise error(f"the {what} path is empty; give a file name")
    if "\0" in s:
        raise error(f"{s!r}: a path cannot contain a NUL byte; give another {what} path")
    for part in Path(s).parts:
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            raise error(f"{s[:60]}...: a file name of {n} bytes is over the {NAME_MAX}-byte limit "
                        f"of file systems; give a shorter {what} name")
    return s


def _protected_by(real: Path, protect: Protected) -> str | None:
    """The input `real` would overwrite (a protected file, or a file inside a protected
    folder), or None."""
    st = None
    with contextlib.suppress(OSError):
        st = os.stat(real)
    for p in protect:
        if p is None:
            continue
        pr = Path(os.path.realpath(p))
        if real == pr or pr in real.parents:
            return os.fspath(p)
        if st is not None and st.st_nlink > 1 and _links_into(st, pr):
            return os.fspath(p)  # a hard link to an input (replacing it is harmless, but
            # writing through it in place is what a careless tool does: refuse it the same)
    return None


def _links_into(st: os.stat_result, protected: Path) -> bool:
    """Whether the file of `st` is `protected` or one of the files directly in that folder."""
    with contextlib.suppress(OSError):
        ps = os.stat(protected)
        if (ps.st_dev, ps.st_ino) == (st.st_dev, st.st_ino):
            return True
        if stat.S_ISDIR(ps.st_mode):
            with os.scandir(protected) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        es = e.stat(follow_symlinks=False)
                        if (es.st_dev, es.st_ino) == (st.st_dev, st.st_ino):
                            return True
    return False


def check_output(path: str | os.PathLike, *, protect: Protected = (), what: str = "output",
                 error: type[MatFormerError] = ConfigError) -> Path:
    """The real file a write to `path` replaces (symlinks followed), or `error` in one line when
    the rule of the module docstring forbids it. Nothing is written."""
    s = check_name(path, what=what, error=error)
    real = Path(os.path.realpath(s))
    try:
        st = os.stat(s)  # the kernel follows links, /proc/self/fd/N's too (to a pipe, a tty)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise error(f"{s}: cannot write the {what} there ({e.strerror or e})") from None
    if st is not None and stat.S_ISREG(st.st_mode) and not os.path.exists(real):
        raise error(f"{s}: is a link to a file that has no name ({os.readlink(s)}); refusing to "
                    f"write the {what} through it; give a regular file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        via = f" (a link to {os.readlink(s)})" if os.path.islink(s) else ""
        raise error(f"{s}{via}: is {file_kind(st.st_mode)}; refusing to write the {what} to it; "
                    f"give a regular file name")
    if not real.parent.is_dir():
        raise error(f"{s}: cannot write the {what} (folder {Path(s).parent} does not exist); "
                    f"create it first")
    hit = _protected_by(real, protect)
    if hit is not None:
        raise error(f"{s}: would overwrite {'a file of ' if hit != s else ''}{hit}, which this "
                    f"command reads; write the {what} elsewhere")
    return real


def check_output_folder(path: str | os.PathLike, *, protect: Protected = (),
                        what: str = "output folder",
                        error: type[MatFormerError] = CheckpointError) -> Path:
    """The real folder a save into `path` replaces (symlinks followed), or `error` in one line
    when it is, lies inside, or contains one of the inputs `protect` (a save replaces the whole
    folder) or its name cannot exist. Nothing is written."""
    s = check_name(path, what=what, error=error)
    real = Path(os.path.realpath(s))
    for p in protect:
        if p is None:
            continue
        pr = Path(os.path.realpath(p))
        if real == pr or pr in real.parents or real in pr.parents:
            rel = ("is the source folder" if real == pr else
                   f"is inside {os.fspath(p)}" if pr in real.parents else f"contains {os.fspath(p)}")
            raise error(f"{s}: {rel}, which this command reads; write the {what} elsewhere (the "
                        f"source stays as it is)")
    return real


@contextlib.contextmanager
def output_temp(path: str | os.PathLike, *, protect: Protected = (), what: str = "output",
                error: type[MatFormerError] = ConfigError, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside the checked target of `path` for the caller to fill; renamed
    over the target when the block ends normally, removed otherwise. OSErrors of the block
    (ENOSPC, EFBIG, ...) become `error` in one line. `suffix` ends the temporary name (writers
    such as matplotlib choose the format by it)."""
    target = check_output(path, protect=protect, what=what, error=error)
    remove_dead_temps(target.parent, temp_prefix(target))
    tmp = temp_path(target).with_name(temp_path(target).name + suffix)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise error(f"{os.fspath(path)}: cannot write the {what} ({e.strerror or e}); nothing was "
                    f"written (an existing file is unchanged)") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def write_output(path: str | os.PathLike, data: bytes | str, *, protect: Protected = (),
                 what: str = "output", error: type[MatFormerError] = ConfigError) -> Path:
    """Replace the checked target of `path` with `data` (str: UTF-8) atomically and durably."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with output_temp(path, protect=protect, what=what, error=error) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            view = memoryview(payload)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
    return Path(os.path.realpath(path))
