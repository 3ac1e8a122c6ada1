"""Which files make a checkpoint, and the cross-file checks of the spec §4.

Order: `model.safetensors.index.json` first, then the single-file names. A name is tried only
when the one before it is *absent*; any other failure (bad JSON, permission) is reported. Files
are never globbed: a stale shard or a stray file in the folder is never mixed in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from .safetensors import Header, TensorInfo, read_header

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


def parse_index(path: Path) -> dict[str, str]:
    """The validated weight_map (tensor name -> shard file name) of an index file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise CheckpointError(f"{path}: expected an object with a 'weight_map' object")
    wm = obj["weight_map"]
    if not wm:
        raise CheckpointError(f"{path}: weight_map is empty")
    for tensor, shard in wm.items():
        check_shard_name(shard, f"{path} (tensor {tensor!r})")
    return dict(wm)


@dataclass
class Layout:
    """The files of one checkpoint folder (not yet opened beyond the index)."""

    folder: Path
    shards: list[str]  # file names, sorted
    index: Path | None = None
    weight_map: dict[str, str] | None = None
    pickle: bool = False  # .bin files: only loaded when the caller opted in


def resolve_files(folder: str | os.PathLike) -> Layout:
    """Find the weights of a checkpoint folder: index first, then the single-file names."""
    d = Path(folder)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a folder")
    idx = d / INDEX_NAME
    if _exists(idx):
        wm = parse_index(idx)
        shards = sorted(set(wm.values()))
        for s in shards:
            if not _exists(d / s):
                raise CheckpointError(f"{idx}: names shard {s!r}, which is missing from {d}")
        return Layout(d, shards, idx, wm)
    for name in SINGLE_NAMES:
        if _exists(d / name):
            return Layout(d, [name])
    if _exists(d / PICKLE_INDEX):
        wm = _parse_pickle_index(d / PICKLE_INDEX)
        return Layout(d, sorted(set(wm.values())), d / PICKLE_INDEX, wm, pickle=True)
    if _exists(d / PICKLE_SINGLE):
        return Layout(d, [PICKLE_SINGLE], pickle=True)
    raise CheckpointError(
        f"{d}: no weights found (looked for {INDEX_NAME}, {', '.join(SINGLE_NAMES)})"
    )


def _parse_pickle_index(path: Path) -> dict[str, str]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        obj = None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{path}: not a valid index (expected a 'weight_map' object)")
    for tensor, shard in wm.items():
        check_shard_name(shard, f"{path} (tensor {tensor!r})", suffix=".bin")
    return dict(wm)


def _exists(p: Path) -> bool:
    """True if `p` exists; an error other than absence (permission...) is reported."""
    try:
        p.stat()
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    except OSError as e:
        raise CheckpointError(f"{p}: cannot access ({e.strerror or e})") from None
    return True


@dataclass
class Checkpoint:
    """A validated set of safetensors files: every tensor, where it lives."""

    layout: Layout
    headers: dict[str, Header] = field(default_factory=dict)  # shard file name -> header
    where: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.where[name]].tensors[name]

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {n: self.info(n) for n in self.where}

    @property
    def files(self) -> list[tuple[str, int]]:
        return [(s, self.headers[s].file_size) for s in self.layout.shards]


def open_checkpoint(layout: Layout) -> Checkpoint:
    """Read and cross-check every header of a safetensors layout (spec §4)."""
    if layout.pickle:
        raise CheckpointError(f"{layout.folder}: holds pickle (.bin) weights; headers are "
                              f"safetensors-only")
    ck = Checkpoint(layout)
    for s in layout.shards:
        ck.headers[s] = read_header(layout.folder / s)
    if layout.weight_map is None:
        (s,) = layout.shards
        ck.where = {n: s for n in ck.headers[s].tensors}
        return ck
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
    return ck
