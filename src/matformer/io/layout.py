"""Which files make a checkpoint, and the cross-file checks of the spec §4.

Order: `model.safetensors.index.json` first, then the single-file names. A name is tried only
when the one before it is *absent*; any other failure (bad JSON, permission) is reported. Files
are never globbed: a stale shard or a stray file in the folder is never mixed in.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from matformer.errors import CheckpointChanged, CheckpointError
from matformer.io.files import read_json
from matformer.io.folder import Folder
from matformer.io.safetensors import Header, TensorInfo, read_header_fd

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAMES = ("model.safetensors", "pytorch_model.safetensors", "model-00001-of-00001.safetensors")
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
CONFIG_NAME = "config.json"


def check_shard_name(name: object, where: str, suffix: str = ".safetensors") -> str:
    """A shard name from an index must be a plain file name inside the checkpoint folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: shard name {name!r} is not a non-empty string")
    bad = (
        "/" in name or "\\" in name or "\x00" in name or ":" in name
        or name in (".", "..") or ".." in name or os.path.isabs(name)
    )
    if bad:
        raise CheckpointError(
            f"{where}: shard name {name!r} is not a plain file name (no '/', '\\', '..', drive or "
            f"root allowed); refusing to open anything outside the checkpoint folder"
        )
    if not name.endswith(suffix):
        raise CheckpointError(f"{where}: shard name {name!r} does not end in {suffix}")
    return name


SAVE_ID_KEY = "matformer_save_id"
"""Written by every matformer save into the index's metadata and each shard's `__metadata__`:
one random id per save, so a load that met files of two saves says so instead of mixing them."""


def parse_index_obj(obj: object, where: str) -> tuple[dict[str, str], str | None]:
    """The validated weight_map (tensor name -> shard file name) of a parsed index, and the save
    id its metadata records (None when not written by matformer)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise CheckpointError(f"{where}: expected an object with a 'weight_map' object")
    wm = obj["weight_map"]
    if not wm:
        raise CheckpointError(f"{where}: weight_map is empty")
    for tensor, shard in wm.items():
        check_shard_name(shard, f"{where} (tensor {tensor!r})")
    meta = obj.get("metadata")
    save_id = meta.get(SAVE_ID_KEY) if isinstance(meta, dict) else None
    return dict(wm), save_id if isinstance(save_id, str) else None


def parse_index(path: Path) -> dict[str, str]:
    """The validated weight_map of an index file."""
    return parse_index_obj(read_json(path), str(path))[0]


@dataclass
class Layout:
    """The files of one checkpoint folder (not yet opened beyond the index)."""

    folder: Path
    shards: list[str]  # file names, sorted
    index: Path | None = None
    weight_map: dict[str, str] | None = None
    pickle: bool = False  # .bin files: only loaded when the caller opted in
    dir: Folder | None = None
    """The folder, opened once: every file of this layout is opened relative to it."""
    save_id: str | None = None
    """The index's save id (see SAVE_ID_KEY)."""

    def opened(self) -> Folder:
        if self.dir is None:
            self.dir = Folder(self.folder)
        return self.dir


def resolve_files(folder: str | os.PathLike | Folder) -> Layout:
    """Find the weights of a checkpoint folder: index first, then the single-file names."""
    fo = folder if isinstance(folder, Folder) else Folder(folder)
    d = fo.path
    if fo.exists(INDEX_NAME):
        idx = d / INDEX_NAME
        wm, save_id = parse_index_obj(fo.read_json(INDEX_NAME), str(idx))
        shards = sorted(set(wm.values()))
        for s in shards:
            if not fo.exists(s):
                fo.check_current(f"shard {s} disappeared")
                raise CheckpointError(f"{idx}: names shard {s!r}, which is missing from {d}")
        return Layout(d, shards, idx, wm, dir=fo, save_id=save_id)
    for name in SINGLE_NAMES:
        if fo.exists(name):
            return Layout(d, [name], dir=fo)
    if fo.exists(PICKLE_INDEX):
        wm = _parse_pickle_index(fo, d / PICKLE_INDEX)
        return Layout(d, sorted(set(wm.values())), d / PICKLE_INDEX, wm, pickle=True, dir=fo)
    if fo.exists(PICKLE_SINGLE):
        return Layout(d, [PICKLE_SINGLE], pickle=True, dir=fo)
    fo.check_current("the weights disappeared")
    raise CheckpointError(
        f"{d}: no weights found (looked for {INDEX_NAME}, {', '.join(SINGLE_NAMES)})"
    )


def _parse_pickle_index(fo: Folder, path: Path) -> dict[str, str]:
    try:
        obj = fo.read_json(PICKLE_INDEX)
    except CheckpointError:
        obj = None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{path}: not a valid index (expected a 'weight_map' object)")
    for tensor, shard in wm.items():
        check_shard_name(shard, f"{path} (tensor {tensor!r})", suffix=".bin")
    return dict(wm)


@dataclass
class Checkpoint:
    """A validated set of safetensors files: every tensor, where it lives, and an open
    descriptor of each file (the headers were read from them; maps and reads use them too, so
    everything comes from the files that were validated). `close()` releases them."""

    layout: Layout
    headers: dict[str, Header] = field(default_factory=dict)  # shard file name -> header
    where: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name
    fds: dict[str, int] = field(default_factory=dict)  # shard file name -> open descriptor

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.where[name]].tensors[name]

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {n: self.info(n) for n in self.where}

    @property
    def files(self) -> list[tuple[str, int]]:
        return [(s, self.headers[s].file_size) for s in self.layout.shards]

    def open_file(self, shard: str):
        """A binary file object of `shard` (the validated file; close it after use)."""
        return os.fdopen(os.dup(self.fds[shard]), "rb")

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def open_checkpoint(layout: Layout) -> Checkpoint:
    """Open every file of a safetensors layout once, read and cross-check its headers (spec §4)
    and check that index and shards come from one save."""
    if layout.pickle:
        raise CheckpointError(f"{layout.folder}: holds pickle (.bin) weights; headers are "
                              f"safetensors-only")
    fo = layout.opened()
    ck = Checkpoint(layout)
    try:
        for s in layout.shards:
            ck.fds[s] = fo.open(s)
            ck.headers[s] = read_header_fd(ck.fds[s], layout.folder / s)
        _check_one_save(layout, ck.headers)
        _cross_check(layout, ck)
    except BaseException:
        ck.close()
        raise
    return ck


def _check_one_save(layout: Layout, headers: dict[str, Header]) -> None:
    ids = {s: (h.metadata or {}).get(SAVE_ID_KEY) for s, h in headers.items()}
    found = {v for v in ids.values() if v is not None}
    if layout.save_id is not None:
        found.add(layout.save_id)
    if len(found) > 1:
        raise CheckpointChanged(f"{layout.folder}: the index and shards come from different saves "
                                f"(a save replaced files while they were read, or files of two "
                                f"checkpoints were mixed); read it again, or save it again")


def _cross_check(layout: Layout, ck: Checkpoint) -> None:
    if layout.weight_map is None:
        (s,) = layout.shards
        ck.where = {n: s for n in ck.headers[s].tensors}
        return
    assert layout.index is not None
    seen: dict[str, str] = {}
    for s, h in ck.headers.items():
        for n in h.tensors:
            if n in seen:
                raise CheckpointError(f"{layout.folder}: tensor {n!r} is in two shards, {seen[n]} "
                                      f"and {s}; refusing to guess which one is current")
            seen[n] = s
    for n, s in layout.weight_map.items():
        if n not in ck.headers[s].tensors:
            raise CheckpointError(f"{layout.index}: says tensor {n!r} is in {s}, but {s} has no "
                                  f"such tensor")
    stray = [n for n in seen if n not in layout.weight_map]
    if stray:
        more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
        raise CheckpointError(
            f"{layout.index}: tensors {stray[:3]}{more} are in shard {seen[stray[0]]} but not in "
            f"the index; the index and shards are from different saves"
        )
    ck.where = dict(layout.weight_map)
